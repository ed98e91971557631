"""The shared build cache service: content-addressed blobs, a build index, ccache remote storage, a web page.

Modules: ``blobs`` (BlobStore: local directory, S3), ``index`` (Index: SQLite, PostgreSQL), ``service``
(validation, eviction, metrics: everything but HTTP), ``app`` (the Starlette app), ``web`` (HTML pages),
``openapi`` (the API description), ``server`` (``kernel-ci cache serve``).
"""
