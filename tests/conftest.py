import os
import sys

# The fake plugins here are loaded through real entry points, which import them by module name.
sys.path.insert(0, os.path.dirname(__file__))
