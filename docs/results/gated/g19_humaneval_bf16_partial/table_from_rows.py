import json,collections,statistics
rows=[json.loads(l) for l in open('docs/results/gated/g19_humaneval_bf16_partial/rows-rank0.jsonl')]
by=collections.defaultdict(dict)
for r in rows: by[r['method']][r['index']]=r
common=sorted(set.intersection(*[set(v) for v in by.values()]))
g='gated:block_size=4:lookup_tokens=5:pool_candidates=1'
names={'base_ar':'base AR','base_hf':'HF `generate`','base_lookahead':'base Lookahead W5 N4 G5',
 'base_lookahead:lookahead_window=3:lookahead_ngram=3:lookahead_guesses=3':'base Lookahead W3 N3 G3',
 g:'g14 head (published), n = 4, lookup 5, pool 1', g+':draft_topk=5:topk_tokens=1':'**the same + 4 runner-up rows** (`draft_topk=5:topk_tokens=1`)'}
ar=by['base_ar']; hf=by['base_hf']
def q(xs,p):
    xs=sorted(xs); k=(len(xs)-1)*p; f=int(k); c=min(f+1,len(xs)-1); return xs[f]+(xs[c]-xs[f])*(k-f)
print(len(common),'prompts')
for m,nm in names.items():
    v=by[m]; t=sum(v[i]['new_tokens'] for i in common); f=sum(v[i]['forwards'] for i in common); s=sum(v[i]['seconds'] for i in common)
    A=sum(ar[i]['seconds'] for i in common); H=sum(hf[i]['seconds'] for i in common)
    one=sum(sum(1 for a in v[i]['accept_lengths'] if a==1) for i in common)/sum(len(v[i]['accept_lengths']) for i in common)
    per=[ar[i]['seconds']/v[i]['seconds'] for i in common]
    same=sum(v[i]['token_ids']==ar[i]['token_ids'] for i in common)
    acc=sum(bool(v[i].get('correct')) for i in common)
    print(f"| {nm} | {t/f:.3f} | {1000*s/f:.1f} | {one:.0%} | {A/s:.3f}x ({q(per,.5):.2f} [{q(per,.1):.2f}, {q(per,.9):.2f}]) | {H/s:.3f}x | {acc}/{len(common)} | {same}/{len(common)} |")
