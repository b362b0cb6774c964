"""``python -m qexport`` = the ``qexport`` command (also under ``torchrun ... -m qexport``)."""

from qexport.cli import main

if __name__ == "__main__":
    main()
