import pytest

from keras_relora.layers.einsum_axes import EinsumAxes

# (equation, kernel shape, d_in, d_out) written out by hand.
CASES = [
    ("bqm,muh->bquh", (8, 2, 4), 8, 8),  # Llama query
    ("bkm,mvh->bkvh", (8, 1, 4), 8, 4),  # Llama key/value
    ("bquh,uhm->bqm", (2, 4, 8), 8, 8),  # Llama attention output
    ("btd,ndh->btnh", (2, 8, 4), 8, 8),  # Gemma query
    ("bsd,kdh->bskh", (1, 8, 4), 8, 4),  # Gemma key/value
    ("btnh,nhd->btd", (2, 4, 8), 8, 8),  # Gemma attention output
    ("abc,cde->abde", (8, 2, 4), 8, 8),  # BERT/CLIP q/k/v
    ("abcd,cde->abe", (2, 4, 8), 8, 8),  # BERT/CLIP output
    ("btd,df->btf", (8, 16), 8, 16),  # Gemma FFN
    ("...a,ab->...b", (6, 3), 6, 3),  # Dense
    ("abc,cd->bad", (5, 3), 5, 3),  # batch axes reordered in the output
]


@pytest.mark.parametrize("equation,shape,d_in,d_out", CASES)
def test_split(equation, shape, d_in, d_out):
    axes = EinsumAxes(equation, shape)
    assert (axes.d_in, axes.d_out) == (d_in, d_out)


def test_split_orders_axes_as_input_and_output():
    # Kernel "ndh": contracted d (input order), free n, h (output order).
    axes = EinsumAxes("btd,ndh->btnh", (2, 8, 4))
    assert axes.in_shape == (8,)
    assert axes.out_shape == (2, 4)
    assert axes.kernel_to_2d == (1, 0, 2)
    # Kernel "uhm": contracted u, h in the input's order "bquh".
    axes = EinsumAxes("bquh,uhm->bqm", (2, 4, 8))
    assert axes.in_shape == (2, 4)
    assert axes.out_shape == (8,)


@pytest.mark.parametrize(
    "equation,shape,message",
    [
        ("ab,bc->abc", (4, 5), "Kernel axes in input and output: ['b']"),
        ("abc,bd->ad", (4, 5), "input axes summed away: ['c']"),
        ("ab,cd->abcd", (4, 5), "Cannot split"),
        ("a+b->c", (4,), "input,kernel->output"),
    ],
)
def test_refuses_what_it_cannot_split(equation, shape, message):
    with pytest.raises(
        ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
    ):
        EinsumAxes(equation, shape)


def test_kernel_rank_mismatch():
    with pytest.raises(ValueError, match="has 2 axes"):
        EinsumAxes("ab,bc->ac", (4, 5, 6))


def test_equations_spell_out_the_ellipsis():
    axes = EinsumAxes("...a,ab->...b", (8, 6))
    assert axes.equations(2) == ("Aa,ar->Ar", "Amr,mrb->Ab")
    assert axes.equations(4) == ("ABCa,ar->ABCr", "ABCmr,mrb->ABCb")
    # Equations without `...` are returned unchanged.
    named = EinsumAxes("btd,ndh->btnh", (4, 8, 2))
    assert named.equations(3) == (
        named.project_equation,
        named.expand_equation,
    )


def test_equations_match_the_ellipsis_form_numerically():
    np = pytest.importorskip("numpy")
    axes = EinsumAxes("...a,ab->...b", (5, 3))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5))
    a = rng.standard_normal((5, 2))
    g = rng.standard_normal((2, 4, 3, 2))
    b = rng.standard_normal((3, 2, 3))
    project, expand = axes.equations(3)
    np.testing.assert_allclose(
        np.einsum(project, x, a), np.einsum(axes.project_equation, x, a)
    )
    np.testing.assert_allclose(
        np.einsum(expand, g, b), np.einsum(axes.expand_equation, g, b)
    )


def test_equations_refuse_an_input_of_too_low_rank():
    axes = EinsumAxes("...ab,abc->...c", (2, 3, 4))
    message = "at least 2 axes; received an input of rank 1"
    with pytest.raises(ValueError, match=message):
        axes.equations(1)
