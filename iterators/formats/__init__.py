"""The one home of every on-disk format the toolkit reads or writes.

Both the data layer (:mod:`iterators`) and the verifier (:mod:`eval`) import these modules; nothing here
imports either of them, MXNet's training code or a config.

| module      | format |
|-------------|--------|
| ``recordio``| insightface's ``train.rec`` / ``train.idx`` / ``property`` (byte-identical to ``mx.recordio``) |
| ``bin_pack``| verification packs ``<name>.bin`` (pickled encoded images + issame flags), safe reader |
| ``pairs``   | pair lists: LFW ``pairs.txt``, ``pairs_label.txt``, balanced pair sampling, contiguous folds |
| ``params``  | MXNet ``prefix-%04d.params`` files (``arg:``/``aux:`` keys of ``mx.model.save_checkpoint``) |
| ``images``  | image files: extensions, the ``H,W`` size parser, the ``DIR/<identity>/<image>`` scanner |
| ``atomic``  | the atomic file writer (temp file + fsync + rename) every writer above and the checkpoints use |
"""
