from llmdrop.claims import check_claims, claims_markdown
from llmdrop.measure import Scores


def _scores(attn, mlp, block):
    return Scores(attn=attn, mlp=mlp, block=block, tokens=10)


def _row(strategy, k, average, ppl=10.0):
    return {"strategy": strategy, "k": k, "average": average, "perplexity": ppl}


DEEP = _scores(attn=[0.5, 0.6, 0.9, 0.95], mlp=[0.7, 0.7, 0.7, 0.7], block=[0.4, 0.5, 0.6, 0.6])
ROWS = [_row("base", 0, 0.60), _row("attn", 2, 0.58), _row("mlp", 2, 0.50), _row("block", 2, 0.40),
        _row("random-attn", 2, 0.45)]


def verdicts(rows, scores):
    return [c.holds for c in check_claims(rows, scores)]


def test_every_finding_holds_when_the_numbers_say_so():
    assert verdicts(ROWS, DEEP) == [True, True, True, True]
    md = claims_markdown(check_claims(ROWS, DEEP))
    assert md.count("| holds |") == 4 and "K=2 attn -2.0 points" in md


def test_each_finding_fails_when_its_numbers_turn():
    shallow = _scores(attn=DEEP.attn[::-1], mlp=DEEP.mlp, block=DEEP.block)
    assert verdicts(ROWS, shallow)[2] is False  # the similar attention layers are the first ones
    low_attn = _scores(attn=[0.1, 0.2, 0.3, 0.4], mlp=DEEP.mlp, block=DEEP.block)
    assert verdicts(ROWS, low_attn)[0] is False
    costly = [r if r["strategy"] != "attn" else _row("attn", 2, 0.45) for r in ROWS]
    assert verdicts(costly, DEEP)[1] is False
    assert verdicts(costly, DEEP)[3] is True  # 0.45 ties random: not worse
    worse = [r if r["strategy"] != "attn" else _row("attn", 2, 0.44) for r in ROWS]
    assert verdicts(worse, DEEP)[3] is False


def test_missing_rows_leave_a_finding_untested_and_perplexity_stands_in_for_tasks():
    assert verdicts([_row("base", 0, 0.6), _row("attn", 2, 0.58)], DEEP)[1:] == [None, True, None]
    no_tasks = [{k: v for k, v in r.items() if k != "average"} | {"perplexity": p}
                for r, p in zip(ROWS, [10, 11, 15, 30, 20])]
    claims = check_claims(no_tasks, DEEP)
    assert [c.holds for c in claims] == [True, True, True, True] and "perplexity x1.10" in claims[1].evidence
