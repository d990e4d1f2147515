"""`python -m mosaic`: the same command line as the `mosaic` script."""

from mosaic.cli import app

if __name__ == "__main__":
    # prog_name keeps usage lines and --help saying "mosaic", not "__main__.py".
    app(prog_name="mosaic")
