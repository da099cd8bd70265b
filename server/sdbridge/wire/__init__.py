"""Talking to the daemon: the protocol's messages, ZMTP over a plain socket, and the client.

Pure Python (the standard library and msgpack): it runs inside Krita's and GIMP's own Pythons.
"""
