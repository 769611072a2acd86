"""`cllm datastore OUT FOLDER...`: a datastore of the base model's own responses from trajectory folders, for the
gated decoder's retrieval branches (`gated:datastore=OUT`, `cllm.decoding.datastore`)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="file to write (.npz), e.g. models/<name>/datastore.npz")
    p.add_argument("folders", nargs="+", help="`cllm gen` output folders of the base model (their fixed points are "
                                              "its greedy responses); never the prompts you evaluate on")
    p.add_argument("--max-ngram", type=int, default=8, help="longest suffix the lookup matches (default: %(default)s)")


def run(args) -> dict:
    from pathlib import Path

    from cllm.data.trajectories import read_manifest, responses
    from cllm.decoding.datastore import Datastore
    from cllm.errors import CllmError

    if args.max_ngram < 1:
        raise CllmError(f"--max-ngram must be >= 1, got {args.max_ngram}")
    models, found = set(), []
    for folder in args.folders:
        manifest = read_manifest(Path(folder))  # refuses a folder that is not a trajectory folder, before any work
        models.add(str(manifest["config"].get("model")))
    if len(models) > 1:
        raise CllmError(f"the folders come from different models ({', '.join(sorted(models))}); one datastore per model")
    for folder in args.folders:
        found += responses(folder)
    store = Datastore(found, args.max_ngram, {"model": models.pop(), "sources": list(args.folders)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    store.save(args.out)
    tokens = len(store.tokens) - len(found)
    print(f"{args.out}: {len(found)} responses, {tokens:,} tokens, suffixes up to {args.max_ngram} tokens")
    return {"responses": len(found), "tokens": tokens}
