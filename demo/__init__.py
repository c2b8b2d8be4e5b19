"""Demo of the charm's encrypted backup on an embedded S3 server."""
