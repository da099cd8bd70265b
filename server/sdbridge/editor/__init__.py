"""What every front-end shares: the canvas and selection rules and the editor session.

Pure Python (the standard library and `sdbridge.wire`): it runs inside Krita and GIMP.
"""
