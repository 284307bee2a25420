"""`medrelay-records`: the clinic's records gateway (docs/records.md).

It runs as the clinic's `records` account, verifies the record bundles clinicians send it, turns
each into a FHIR R4 transaction Bundle (`fhir_mapping`), delivers it from a durable outbox
(`outbox`) to a sink (`sinks`), and posts a receipt into the visit's thread (`gateway`).
"""
