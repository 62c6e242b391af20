"""Dataset tools (each a ``python -m`` command; the library functions they use log, only ``main`` prints).

| command                                         | does |
|-------------------------------------------------|------|
| ``python -m iterators.tools.build_rec``         | aligned images (folder tree or face2rec2 ``.lst``) -> ``train.rec/.idx/property`` |
| ``python -m iterators.tools.datasets``          | the offline datasets: ORL faces and synthetic identities (``.rec`` + ``.bin``) |
| ``python -m iterators.tools.inspect_dataset``   | statistics, consistency checks and a sample grid of a dataset directory |

The verification-pack builder sits with the verifier: ``python -m eval.build_bin`` (pair list, image folder or
``.rec`` -> ``<name>.bin``). ``python -m iterators.build_rec`` and ``python -m iterators.datasets`` are kept as
aliases of the first two.
"""
