"""Layer 1, settings: the typed schema (schema.py), the serving config built on it (config.py),
the command-line options generated from it (options.py), and the machine the config's unset
values are resolved against (machine.py). Imports only errors and logs below it."""
