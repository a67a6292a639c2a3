"""The Learning screen (issue 22 §5): adapters, the privacy budget plotted, training curves, lineage with
forgetting, the daemon and "adapt now", on a real database and the real `ember adapt`."""
from __future__ import annotations

from textual.widgets import DataTable, Label, OptionList
from textual_plotext import PlotextPlot

from assistant.tui.app import EmberApp
from assistant.tui.screens.learning import LearningScreen
from assistant.tui.screens.modals import ConfirmScreen
from storage import conversations as convs
from storage import ledger, registry
from tests.test_tui import chat, notified
from tests.tui_helpers import seed_conversations, wait_until


def _adapter(db, adapter_id: str, sources: list[int], epsilon: float, losses: list[float], status: str) -> None:
    registry.register(db, {"id": adapter_id, "path": f"/nowhere/{adapter_id}.gguf", "kind": "lora", "method": "lora",
                           "base_sha256": "x", "params": {"rank": 2},
                           "eval": {"heldout_loss": 3.5, "base_loss": 3.73, "train_losses": losses},
                           "status": status, "epsilon": epsilon, "delta": 1e-6, "examples": len(sources)},
                      [(m, "train") for m in sources], activate=False)
    ledger.record(db, f"run-{adapter_id}", method="lora", dp=True, epsilon=epsilon, delta=1e-6, sigma=1.2,
                  clip=1.0, sample_rate=0.2, steps=len(losses), examples=len(sources))


async def test_learning_screen_shows_adapters_budget_curves_and_forgets_from_lineage(settings, engine, db):
    picnic, pancakes = seed_conversations(db)
    picnic_ids = [m["id"] for m in convs.messages(db, picnic)]
    pancake_ids = [m["id"] for m in convs.messages(db, pancakes)]
    _adapter(db, "lora-20260501-100000-aaaa", picnic_ids, 8.0, [3.9, 3.7, 3.6, 3.4], "inactive")
    _adapter(db, "lora-20260502-100000-bbbb", picnic_ids + pancake_ids, 4.0, [3.8, 3.5, 3.1], "rejected")
    app = EmberApp(settings, engine=engine)
    async with app.run_test(size=(140, 45)) as pilot:
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, LearningScreen), timeout=10)
        screen = app.screen
        table = screen.query_one("#adapters", DataTable)
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert [r[1] for r in rows] == ["rejected", "inactive"]            # newest first
        assert rows[0][3] == "4.00" and rows[1][3] == "8.00" and rows[1][6] == "✓ 3.73→3.50"
        summary = str(screen.query_one("#privacy-summary", Label).render())
        assert "ε 12.00 spent of 32 (20.00 left)" in summary and "2 private runs" in summary
        epsilon = screen.query_one("#epsilon-plot", PlotextPlot).plt.build()
        losses = screen.query_one("#loss-plot", PlotextPlot).plt.build()
        assert "ε spent" in epsilon and "Training loss" in losses and "lora…bbbb" in losses

        # The highlighted (newest) adapter learned from both conversations; forgetting one says which
        # adapters it withdraws before anything is deleted.
        lineage = screen.query_one("#lineage", OptionList)
        assert lineage.option_count == 2
        target = next(i for i in range(2) if lineage.get_option_at_index(i).id == str(pancakes))
        lineage.focus()
        lineage.highlighted = target
        await pilot.press("delete")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=10)
        assert "lora-20260502-100000-bbbb" in app.screen.question and "1 adapter" in app.screen.question
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, LearningScreen), timeout=10)
        assert convs.list_conversations(db)[0]["id"] == picnic and len(convs.list_conversations(db)) == 1
        assert registry.get(db, "lora-20260502-100000-bbbb")["status"] == "tainted"
        assert registry.get(db, "lora-20260501-100000-aaaa")["status"] == "inactive"
        assert "tainted" in [str(table.get_row_at(i)[1]) for i in range(table.row_count)]
        assert "Daemon: never run" in str(screen.query_one("#daemon-state", Label).render())

        # Adapt now runs the real `ember adapt`: two conversations' words are not enough, and it says so.
        await pilot.press("ctrl+a")
        await wait_until(pilot, lambda: notified(app, "Adaptation did not run"), timeout=120)
        assert notified(app, "not enough to learn from")
        await pilot.press("escape")
        assert app.screen is chat(app)
