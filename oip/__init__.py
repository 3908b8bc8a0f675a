"""The Open Inference Protocol v2 codec and the latency statistics, shared by `service` and `benchmarks`.

Placed below both so that the server, the load generator and the peer servers read and write the same bytes
with the same (strict) code, while `benchmarks` still never imports `service`. Depends only on numpy, pydantic
and `engines.base` (the datatype table).

    oip.schema      request/response models (pydantic)
    oip.codec       bodies <-> arrays, JSON and Triton's binary tensor extension, both directions
    oip.parameters  request parameters: binary_data*, timeout, priority
    oip.stats       percentiles, interleaved schedules, bootstrap intervals
"""
