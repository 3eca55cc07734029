"""The bundled Finnish demo, kept apart from the library: the GIMP-manual corpus extractor
(`gimp_corpus`, behind tools/gimp_help_to_jsonl.py and the bundled sample) and the two
memorisation tasks built from that sample (`gimp_tasks`, tools/make_eval_tasks.py). The
quickstart and the tests use them; training, conversion and evaluation do not."""
