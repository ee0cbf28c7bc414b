"""The loaders: `base` (the Backend protocol every loader implements), `registry` (the one list of loaders,
how a model path picks one, what each can do), `models` (the models folder and name resolution), `embedded`
(the bundled default model), and one folder per family: `hf/` (transformers, bitsandbytes, GPTQ), `llamacpp/`
and `remote/`. Nothing is imported here, so reading the registry costs no heavy import; a loader's module is
imported when it is first used."""
