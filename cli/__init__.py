"""The spectra command-line application (installed as the import package ``spectra_cli``)."""
