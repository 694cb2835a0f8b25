import pytest
from copgen.modalities import Modality, parse_list
from copgen.seeds import randn, sample_seed


def test_canonical_order_matches_release():
    assert [m.name for m in Modality] == ["DEM", "S1RTC", "S2L1C", "S2L2A"]
    assert [int(m) for m in Modality] == [0, 1, 2, 3]
    assert Modality.S2L2A.dataset == "Core-S2L2A"
    assert Modality.S1RTC.reference_name == "s1_rtc"


@pytest.mark.parametrize("text", ["s2l2a", "S2L2A", " s2_l2a", "Core-S2L2A", "s2-l2a", 3])
def test_parse_accepts_user_spellings(text):
    assert Modality.parse(text) is Modality.S2L2A


def test_parse_error_lists_valid_names():
    with pytest.raises(ValueError, match="DEM, S1RTC, S2L1C, S2L2A"):
        Modality.parse("S3OLCI")
    with pytest.raises(ValueError, match="0..3"):
        Modality.parse(7)


def test_parse_list_is_canonical_and_unique():
    assert parse_list("S2L2A, dem,S2L2A") == (Modality.DEM, Modality.S2L2A)


def test_sample_seed_depends_on_identity_only():
    a = sample_seed(0, "454U_120R", 5, 1)
    assert a == sample_seed(0, "454U_120R", 5, 1)
    assert len({a, sample_seed(1, "454U_120R", 5, 1), sample_seed(0, "454U_121R", 5, 1),
                sample_seed(0, "454U_120R", 6, 1), sample_seed(0, "454U_120R", 5, 2)}) == 5
    batch = randn([a, a + 1], (2, 3))
    alone = randn([a + 1], (2, 3))
    assert (batch[1] == alone[0]).all()
