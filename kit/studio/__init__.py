"""kit studio: a local web page to plan, watch, compare and export runs (kit studio --help). server.py serves the
page; kitapi.py is the one module that imports the kit's internals."""
