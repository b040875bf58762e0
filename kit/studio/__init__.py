"""kit studio: a local web page to plan, watch, compare and export runs (kit studio --help). server.py serves the
page; kitapi.py is its one module that imports the kit's stages, any of them (it sits above the recipes); only
kit.cli imports the studio."""
