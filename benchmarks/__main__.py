"""``python -m benchmarks``.  Nothing at import time: spawn and forkserver
children import this module as ``__mp_main__``, and must stay cheap."""

if __name__ == "__main__":
    import sys

    from benchmarks._cli import main

    sys.exit(main())
