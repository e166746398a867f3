"""Local Kafka + Redis stack started from the broker jars and Debian's redis-server."""
