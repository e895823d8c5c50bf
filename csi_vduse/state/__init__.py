"""Durable state: volume records beside the images (data dir) and staging records (state dir)."""
