"""Each verb's options are declared once (deltaport.options): the command's flags, the library function's
keyword defaults and its documented options all come from that declaration and cannot drift apart."""

from __future__ import annotations

import importlib
import inspect

import pytest
import typer.main

from deltaport import options
from deltaport.cli.main import app
from deltaport.options import REQUIRED, Option, declared, flag, option_fields

# verb, its options class, the library function the command calls
VERBS = [
    ("transfer", options.TransferOptions, "deltaport.api:transfer"),
    ("diff", options.DiffOptions, "deltaport.api:diff"),
    ("apply", options.ApplyOptions, "deltaport.api:apply"),
    ("compress", options.CompressOptions, "deltaport.compression:compress"),
    ("inspect", options.InspectOptions, "deltaport.inspect:inspect"),
    ("finetune", options.FinetuneOptions, "deltaport.finetune:finetune"),
    ("evolve", options.EvolveOptions, "deltaport.evolve:run_chain"),
    ("connectivity", options.ConnectivityOptions, "deltaport.connectivity:connectivity"),
    ("similarity", options.SimilarityOptions, "deltaport.similarity:similarity"),
    ("check", options.CheckOptions, "deltaport.check:check"),
    ("eval", options.EvaluateOptions, "deltaport.evaluation:evaluate"),
]


def _function(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("verb,cls,target", VERBS)
def test_flags_defaults_and_docstring_come_from_the_declaration(verb, cls, target):
    assert cls.verb == verb
    params = {p.name: p for p in typer.main.get_command(app).commands[verb].params}
    fn = _function(target)
    sig = inspect.signature(fn).parameters
    doc = inspect.getdoc(fn)
    for f, opt in option_fields(cls):
        p = params[f.name]
        assert p.opts == [flag(f.name)], (verb, f.name, p.opts)
        assert p.help == opt.help, (verb, f.name)
        if opt.default is REQUIRED:
            assert p.required and sig[f.name].default is inspect.Parameter.empty, (verb, f.name)
        else:
            assert sig[f.name].default == opt.default, (verb, f.name)
            # a repeatable flag left out passes nothing (the function's default applies)
            assert p.default == (None if p.multiple else opt.default), (verb, f.name)
        assert f"    {f.name} (" in doc and (opt.doc or opt.help) in doc, (verb, f.name)


def test_finetune_device_defaults_to_auto_on_both_sides():
    """Before the options were declared once, ``--device`` defaulted to auto and ``finetune()`` to None."""
    from deltaport.finetune import finetune

    assert inspect.signature(finetune).parameters["device"].default == "auto"
    params = {p.name: p for p in typer.main.get_command(app).commands["finetune"].params}
    assert params["device"].default == "auto"
    assert all(params[n].help for n in ("lora_r", "lora_alpha", "seed"))


def test_a_signature_that_disagrees_with_its_declaration_is_refused():
    @options.options
    class Demo:
        verb = "demo"
        level: int = Option(3, "how much")

    def good(x, *, level: int = Demo().level):
        """Do x."""

    assert "level (default 3): how much" in declared(Demo)(good).__doc__

    def drifted(x, *, level: int = 4):
        """Do x."""

    with pytest.raises(TypeError, match="level must default to Demo.level"):
        declared(Demo)(drifted)

    def missing(x, *, other: int = 3):
        """Do x."""

    with pytest.raises(TypeError, match="level"):
        declared(Demo)(missing)


def test_literal_choices_are_listed_in_the_docstring():
    import deltaport

    doc = inspect.getdoc(deltaport.transfer)
    assert "vocab_policy ('error' | 'pad' | 'align', default 'error')" in doc
    assert "chat_template_from ('target' | 'source-finetuned', default 'source-finetuned')" in doc
