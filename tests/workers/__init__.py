"""Scripts that tests run in subprocesses (``python tests/workers/NAME.py ARGS``), and the
plans they share with their tests (imported by the test as ``workers.NAME``).

Each is run with its own folder first on ``sys.path`` and a temporary folder (or "/") as
the working directory, never the repository root, so that it imports the installed
kvmmap (from the root, the uncompiled source folder would shadow it). Nothing here is
collected by pytest.
"""
