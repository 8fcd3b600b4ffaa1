"""The state: Redis keys, Lua scripts, the client and the embedded server, the version store and
the on-disk artifacts.
"""
