"""Sub-commands of the wsld CLI."""
