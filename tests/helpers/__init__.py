"""Test helpers: a real SeaweedFS S3 server and a bubblewrap sandbox for Pebble exec."""
