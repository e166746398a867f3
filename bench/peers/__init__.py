"""Peers: what users would write by hand instead of inferq, measured by the same harness.

Each peer consumes `{prefix}.requests.{model}` and answers in inferq's wire format, in Redis
(`{prefix}:result:{id}`) and on `{prefix}.results.{model}`, so the harness counts and decodes
their results exactly as it does the worker's. `naive`: a hand-written aiokafka loop, one
request at a time. `faststream_peer`: the same job with FastStream, per message or per batch.
"""
