from llmdrop.claims import FAILS, HOLDS, MIXED, UNTESTED, check_claims, claims_markdown
from llmdrop.measure import Scores


def _scores(attn, mlp, block):
    return Scores(attn=attn, mlp=mlp, block=block, tokens=10)


def _row(strategy, k, average, ppl):
    return {"strategy": strategy, "k": k, "average": average, "perplexity": ppl}


DEEP = _scores(attn=[0.5, 0.6, 0.9, 0.95], mlp=[0.7, 0.7, 0.7, 0.7], block=[0.4, 0.5, 0.6, 0.6])
ROWS = [_row("base", 0, 0.60, 10), _row("attn", 2, 0.58, 11), _row("mlp", 2, 0.50, 15), _row("block", 2, 0.40, 30),
        _row("random-attn", 2, 0.45, 20)]


def verdicts(rows, scores=DEEP):
    return [c.verdict for c in check_claims(rows, scores)]


def _with_attn(average, ppl):
    return [r if r["strategy"] != "attn" else _row("attn", 2, average, ppl) for r in ROWS]


def test_every_finding_holds_when_the_numbers_say_so():
    assert verdicts(ROWS) == [HOLDS] * 4
    md = claims_markdown(check_claims(ROWS, DEEP))
    assert md.count("| holds |") == 4 and "K=2: attn -2.0 pts, ppl x1.10; mlp -10.0 pts, ppl x1.50" in md


def test_each_finding_fails_when_its_numbers_turn():
    assert verdicts(ROWS, _scores(DEEP.attn[::-1], DEEP.mlp, DEEP.block))[2] == FAILS  # the first layers are similar
    assert verdicts(ROWS, _scores([0.1, 0.2, 0.3, 0.4], DEEP.mlp, DEEP.block))[0] == FAILS
    # one outlying first layer drags the mean below the MLP's, not the typical (median) layer
    assert verdicts(ROWS, _scores([0.1, 0.99, 0.99, 0.99], [0.9] * 4, DEEP.block))[0] == HOLDS
    assert verdicts(_with_attn(0.30, 40))[1] == FAILS and verdicts(_with_attn(0.30, 40))[3] == FAILS
    assert verdicts(_with_attn(0.45, 20))[3] == HOLDS  # a tie with random is not worse


def test_accuracy_and_perplexity_disagreeing_is_mixed():
    v = verdicts(_with_attn(0.44, 12))  # less accurate than random, but lower perplexity
    assert v[3] == MIXED and v[1] == MIXED


def test_missing_rows_leave_a_finding_untested_and_perplexity_decides_alone_without_tasks():
    assert verdicts([_row("base", 0, 0.6, 10), _row("attn", 2, 0.58, 11)])[1:] == [UNTESTED, HOLDS, UNTESTED]
    no_tasks = [{k: v for k, v in r.items() if k != "average"} for r in ROWS]
    claims = check_claims(no_tasks, DEEP)
    assert [c.verdict for c in claims] == [HOLDS] * 4 and "attn ppl x1.10" in claims[1].evidence
