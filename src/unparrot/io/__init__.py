"""Format readers and writers: webdataset tars (`tar`), a sample's members (`samples`), other input formats
(`readers`) and shard size files (`sizes`). Part of the ground floor with `imaging`: it imports no stage
(tests/test_imaging.py checks); the stages that use it (ingest, curate.reshard) live above it."""
