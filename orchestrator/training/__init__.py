"""Training a job: the run recipe (`recipe`), the Ray launch (`launch`, the only module that calls
the Ray driver API) and what runs on each worker (`worker`, `steps`, `checkpoint`). Never imports search."""
