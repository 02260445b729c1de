import codestop


def test_all_names_every_lazy_export():
    # __all__ is written out for linters and type checkers; it must stay the names codestop loads lazily
    assert codestop.__all__ == sorted(codestop._EXPORTS)
    for name in codestop.__all__:
        assert getattr(codestop, name) is not None
