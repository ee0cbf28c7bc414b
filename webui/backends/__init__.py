"""The loaders: `base` (the Backend protocol every loader implements), `registry` (the one list of loaders,
how a model path picks one, what each can do) and one module per loader. Nothing is imported here, so
reading the registry costs no heavy import; a loader's module is imported when it is first used."""
