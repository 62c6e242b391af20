"""Machinery shared by FaceImageIter and TripletFaceImageIter: the decode thread pool and the helpers of their
resumable state (``state_dict`` / ``load_state_dict``)."""
import concurrent.futures

import numpy as np

# Version of the dicts returned by the iterators' state_dict(); bump when their meaning changes.
STATE_VERSION = 1


class DecodeWorkersMixin:
    """Owns ``self._executor``: ``num_workers`` decode threads, or None (decode in the calling thread) for 0.

    cv2.imdecode releases the GIL, so threads decode in parallel; ``close()`` (also run on garbage collection)
    stops them and cancels work not yet started.
    """

    _executor = None

    def _start_workers(self, num_workers, thread_name_prefix):
        self._executor = (concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix=thread_name_prefix)
                          if num_workers > 0 else None)

    def close(self):
        """Stop the decode threads (pending work is cancelled)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def jsonable(value):
    """``value`` with numpy scalars/arrays turned into Python ints/floats/lists (dicts and lists recursively)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def rng_state_to_json(generator):
    """The bit-generator state of a ``numpy.random.Generator`` as a JSON-serialisable dict."""
    return jsonable(generator.bit_generator.state)


def set_rng_state(generator, state):
    """Restore into ``generator`` a state from :func:`rng_state_to_json` (its bit generator must be the same kind)."""
    if state.get("bit_generator") != type(generator.bit_generator).__name__:
        raise ValueError(f"saved generator state is {state.get('bit_generator')!r}, this generator is "
                         f"{type(generator.bit_generator).__name__}")
    state = dict(state)
    if isinstance(state.get("state"), dict):  # MT19937 keeps its key as an array
        state["state"] = {k: (np.asarray(v, dtype=np.uint32) if isinstance(v, list) else v)
                          for k, v in state["state"].items()}
    generator.bit_generator.state = state


def check_state_header(owner, state, version):
    """Raise ``ValueError`` unless ``state`` is a dict saved by ``owner`` (a class name) with ``version``."""
    kind = state.get("type") if isinstance(state, dict) else type(state).__name__
    if not isinstance(state, dict) or kind != owner:
        raise ValueError(f"{owner}.load_state_dict: not a {owner} state (type={kind!r})")
    if state.get("version") != version:
        raise ValueError(f"{owner}.load_state_dict: state version {state.get('version')!r}, this code reads "
                         f"version {version}")


def check_state_config(owner, saved, current):
    """Raise ``ValueError`` naming the first construction field whose saved value differs from this iterator's."""
    for field in sorted(set(saved) | set(current)):
        if jsonable(saved.get(field)) != jsonable(current.get(field)):
            raise ValueError(
                f"{owner}.load_state_dict: {field} mismatch: the state was saved with {field}="
                f"{saved.get(field)!r} but this iterator has {field}={current.get(field)!r}; build the "
                "iterator with the arguments and data of the saved run")
