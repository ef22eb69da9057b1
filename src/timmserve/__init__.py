"""timmserve: serve any timm image classifier over HTTP with LitServe, and measure it honestly."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("timmserve")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
