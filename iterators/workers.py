"""The decode thread pool shared by FaceImageIter and TripletFaceImageIter."""
import concurrent.futures


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
