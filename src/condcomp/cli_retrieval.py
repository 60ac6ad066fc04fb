"""``condcomp retrieval ...``: index a collection with a token encoder, search it (with an explanation
of which query tokens matched which document tokens), fine-tune an encoder with the XTR or ColBERT
objective, and evaluate encoders and scorers on a benchmark."""

from __future__ import annotations

from condcomp.cli_args import number


def _encoder(name: str):
    from condcomp.retrieval import TokenEncoder

    return TokenEncoder.load(name)


def _index(args) -> int:
    from condcomp.retrieval import load_retrieval_set
    from condcomp.retrieval.evaluate import build_index

    data = load_retrieval_set(args.data, args.split)
    encoder = _encoder(args.model)
    index, seconds, truncated = build_index(encoder, data, doc_max_length=args.doc_max_length, kind=args.kind,
                                            nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                                            ef_search=args.ef_search)
    index.save(args.out)
    note = f"; {truncated} documents longer than {args.doc_max_length} tokens were truncated" if truncated else ""
    print(f"indexed {index.num_docs} documents ({len(index.vectors):,} tokens, {index.size_bytes() / 2**20:.1f} MiB, "
          f"{args.kind}) of {data.description}: encoded in {seconds:.1f} s, index built in {index.build_seconds:.1f} s"
          f"{note}; index in {args.out}")
    return 0


def _search(args) -> int:
    from condcomp.retrieval import RetrievalError, TokenIndex, search_colbert, search_single_vector, search_xtr

    if not args.query.strip():
        raise RetrievalError("--query is empty; give the text to search for")
    encoder = _encoder(args.model)
    index = TokenIndex.load(args.index, expect=encoder.fingerprint)
    encoded = encoder.encode([args.query], max_length=args.query_max_length, precision="fp32")
    if encoded.truncated:
        print(f"note: the query is longer than {args.query_max_length} tokens and was truncated to them "
              "(raise --query-max-length, up to the encoder's limit)")
    query = encoded.text(0)
    if args.scorer == "xtr":
        ranking = search_xtr(index, query, k_prime=args.k_prime, top=args.top)
    elif args.scorer == "colbert":
        ranking = search_colbert(index, query, top=args.top)
    else:
        ranking = search_single_vector(index, query, top=args.top)
    tokens = encoder.tokenizer.convert_ids_to_tokens(encoded.token_ids.tolist())
    print(f"{'rank':>4} {'score':>7}  document")
    for r, (d, s) in enumerate(zip(ranking.docs, ranking.scores), 1):
        print(f"{r:>4} {s:>7.4f}  {index.doc_keys[d]}")
    if len(ranking.docs) == 0:
        print("no document matched")
        return 0
    best = int(ranking.docs[0])
    sims, rows = index.search(query, args.k_prime)
    print(f"\nwhy {index.doc_keys[best]}: each query token's best retrieved token of it "
          f"(XTR, k'={args.k_prime}; '-' = none retrieved, scored as the token's k'-th similarity)")
    print(f"{'query token':>16}  {'document token':>16}  {'similarity':>10}")
    for i, tok in enumerate(tokens):
        mine = [(s, r) for s, r in zip(sims[i], rows[i]) if r >= 0 and index.doc_of_token[r] == best]
        if mine:
            s, r = max(mine)
            doc_tok = encoder.tokenizer.convert_ids_to_tokens([int(index.token_ids[r])])[0]
            print(f"{tok:>16}  {doc_tok:>16}  {s:>10.4f}")
        else:
            last = sims[i][rows[i] >= 0]
            print(f"{tok:>16}  {'-':>16}  {float(last.min()) if len(last) else 0.0:>10.4f}")
    return 0


def _train(args) -> int:
    from condcomp.retrieval import load_retrieval_set
    from condcomp.retrieval.train import RetrievalTrainConfig, train_encoder

    cfg = RetrievalTrainConfig(objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               k_train=args.k_train, doc_max_length=args.doc_max_length, seed=args.seed)
    data = load_retrieval_set(args.data, "train")
    encoder = _encoder(args.model)
    record = train_encoder(encoder, data, cfg, args.out)
    print(f"trained {args.objective} for {cfg.steps} steps on {data.description} ({record['train_seconds']:.0f} s); "
          f"encoder saved in {args.out}")
    return 0


def _eval(args) -> int:
    from condcomp.retrieval import load_retrieval_set
    from condcomp.retrieval.evaluate import evaluate
    from condcomp.retrieval.report import result_table

    data = load_retrieval_set(args.data, args.split).take(args.queries)
    encoder = _encoder(args.model)
    result = evaluate(encoder, data, scorers=args.scorers, k_prime=args.k_prime, kind=args.kind,
                      doc_max_length=args.doc_max_length)
    print(result_table(result, label=args.model, k_prime=args.k_prime))
    if args.out:
        from dataclasses import asdict

        from condcomp.files import write_json_atomic

        write_json_atomic(args.out, {"model": args.model, "k_prime": args.k_prime, **asdict(result)})
    return 0


def add_parser(sub) -> None:
    from condcomp.retrieval.evaluate import SCORERS
    from condcomp.retrieval.index import KINDS

    p = sub.add_parser("retrieval", help="multi-vector retrieval: index, search, train (XTR / ColBERT), eval")
    rsub = p.add_subparsers(dest="retrieval_command", required=True)
    data_help = "bbc (BBC News title -> article), stdlib (docstring -> function), or a .jsonl of {doc, query}"
    model_help = "the token encoder: minilm (off the shelf) or a folder from `condcomp retrieval train`"

    i = rsub.add_parser("index", help="encode a collection's documents and write a token index")
    i.add_argument("--data", default="bbc", help=data_help)
    i.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split's queries (the "
                   "collection is the same for every split)")
    i.add_argument("--model", default="minilm", help=model_help)
    i.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    i.add_argument("--kind", default="flat", choices=KINDS, help="faiss index: exact, IVF or HNSW")
    i.add_argument("--nlist", type=number(int, minimum=1), default=1024, help="IVF cells")
    i.add_argument("--nprobe", type=number(int, minimum=1), default=32, help="IVF cells searched per query token")
    i.add_argument("--hnsw-m", type=number(int, minimum=2), default=32, help="HNSW links per node")
    i.add_argument("--ef-search", type=number(int, minimum=1), default=128, help="HNSW candidates per search")
    i.add_argument("--doc-max-length", type=number(int, minimum=4, maximum=512), default=128,
                   help="document tokens kept (longer documents are truncated, and counted)")
    i.set_defaults(func=_index)

    s = rsub.add_parser("search", help="rank an index's documents for a query and explain the best match")
    s.add_argument("--index", required=True, help="index folder from `condcomp retrieval index`")
    s.add_argument("--model", default="minilm", help=model_help + " (the one that built the index)")
    s.add_argument("--query", required=True, help="the text to search for")
    s.add_argument("--scorer", default="xtr", choices=("xtr", "colbert", "single"), help="how documents are scored")
    s.add_argument("--k-prime", type=number(int, minimum=1, maximum=100000), default=100,
                   help="XTR: document tokens retrieved per query token")
    s.add_argument("--top", type=number(int, minimum=1, maximum=10000), default=5, help="documents to print")
    s.add_argument("--query-max-length", type=number(int, minimum=4, maximum=512), default=32,
                   help="query tokens kept (a longer query is truncated, with a note)")
    s.set_defaults(func=_search)

    t = rsub.add_parser("train", help="fine-tune a token encoder on a benchmark's training pairs")
    t.add_argument("--data", default="bbc", help=data_help)
    t.add_argument("--model", default="minilm", help=model_help)
    t.add_argument("--objective", default="xtr", choices=("xtr", "colbert"), help="in-batch scoring of the loss")
    t.add_argument("--steps", type=number(int, minimum=1, maximum=10**7), default=100, help="training steps")
    t.add_argument("--batch-size", type=number(int, minimum=2, maximum=4096), default=16, help="pairs per step")
    t.add_argument("--lr", type=number(float, minimum=0.0, strictly=True), default=5e-5, help="peak learning rate")
    t.add_argument("--k-train", type=number(int, minimum=1), default=256,
                   help="XTR: document tokens each query token keeps over the batch")
    t.add_argument("--doc-max-length", type=number(int, minimum=4, maximum=512), default=128, help="document tokens kept")
    t.add_argument("--seed", type=number(int, minimum=0), default=0, help="seeds the batches")
    t.add_argument("--out", required=True, help="folder for the fine-tuned encoder")
    t.set_defaults(func=_train)

    e = rsub.add_parser("eval", help="quality and cost of each scorer for an encoder on a benchmark")
    e.add_argument("--data", default="bbc", help=data_help)
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="whose queries")
    e.add_argument("--model", default="minilm", help=model_help)
    e.add_argument("--scorers", nargs="+", choices=SCORERS, default=list(SCORERS), help="scorers to compare")
    e.add_argument("--k-prime", type=number(int, minimum=1, maximum=100000), default=100,
                   help="tokens retrieved per query token (XTR, ColBERT rerank)")
    e.add_argument("--kind", default="flat", choices=KINDS, help="faiss index kind")
    e.add_argument("--queries", type=number(int, minimum=1), help="evaluate the first N queries only")
    e.add_argument("--doc-max-length", type=number(int, minimum=4, maximum=512), default=128, help="document tokens kept")
    e.add_argument("--out", help="also write the result as JSON here")
    e.set_defaults(func=_eval)
