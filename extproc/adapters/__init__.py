"""The only modules that import network clients (redis, later boto3).

Third-party exceptions are translated into the broker's own here and nowhere else.
"""
