"""The Learning screen (Ctrl+L): what Ember learned, from what, at what privacy cost.

Adapters (active, past, rejected, tainted) with their method, ε, δ, examples, gate result and date; the
privacy ledger plotted as ε spent over the runs against the budget, and the training-loss curves of the
runs (textual-plotext); for the adapter highlighted, the conversations it learned from, by lineage,
each of which can be forgotten after seeing which adapters that withdraws; and the idle-time daemon's
state, with a button that runs `ember adapt` now (the same learning path as the CLI and the daemon).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Label, OptionList
from textual.widgets.option_list import Option
from textual_plotext import PlotextPlot

from assistant.display import display_time, display_title
from assistant.tui.errors import shows_errors
from assistant.tui.screens.modals import ConfirmScreen
from assistant.tui.widgets.status_line import progress, short_id
from storage import activity, ledger, registry, runs
from storage import conversations as convs

REFRESH_SECONDS = 2.0


def gate_result(adapter: dict[str, Any]) -> str:
    """The evaluation gate's verdict in a few characters: ✓ or ✗, and held-out loss (base → adapter)."""
    ev = adapter.get("eval") or {}
    loss, base = ev.get("heldout_loss"), ev.get("base_loss")
    shown = f"{base:.2f}→{loss:.2f}" if isinstance(loss, (int, float)) and isinstance(base, (int, float)) else ""
    return f"{'✗' if adapter['status'] == 'rejected' else '✓'} {shown}".strip()


class LearningScreen(Screen[None]):
    """Adapters, the privacy budget, training curves, lineage and the daemon."""

    BINDINGS = [Binding("escape,ctrl+l", "close", "Back to the chat"),
                Binding("ctrl+a", "adapt_now", "Adapt now"),
                Binding("delete", "forget_conversation", "Forget conversation")]

    def __init__(self) -> None:
        super().__init__()
        self.live_losses: list[float] = []   # the running adaptation's loss, as polled
        self._live_run: str | None = None
        self.adapting: subprocess.Popen | None = None

    def compose(self) -> ComposeResult:
        yield Label("Learning: what Ember learned from you, and at what privacy cost", id="learning-title")
        with Horizontal(id="learning-main"):
            with Vertical(id="learning-plots"):
                yield Label("", id="privacy-summary")
                yield PlotextPlot(id="epsilon-plot")
                yield PlotextPlot(id="loss-plot")
            with Vertical(id="learning-side"):
                yield DataTable(id="adapters", cursor_type="row", zebra_stripes=True)
                yield Label("Learned from (Delete forgets the highlighted conversation):", classes="dialog-help")
                yield OptionList(id="lineage")
        yield Label("", id="daemon-state")
        with Horizontal(id="learning-buttons", classes="dialog-buttons"):
            yield Button("Adapt now", id="adapt-now", variant="primary")
            yield Button("Back to the chat", id="close")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#adapters", DataTable)
        table.add_columns("adapter", "status", "method", "ε", "δ", "ex.", "gate", "date")
        self.refresh_all()
        self.set_interval(REFRESH_SECONDS, self.poll)
        table.focus()

    @shows_errors
    def refresh_all(self) -> None:
        db = self.app.db
        adapters = registry.list_adapters(db)
        table = self.query_one("#adapters", DataTable)
        keep = table.cursor_row
        table.clear()
        for a in adapters:
            table.add_row(short_id(a["id"]), a["status"], a["method"],
                          "–" if a["epsilon"] is None else f"{a['epsilon']:.2f}",
                          "–" if a["delta"] is None else f"{a['delta']:.0e}", str(a["examples"]),
                          gate_result(a), display_time(a["created"], "%y-%m-%d"), key=a["id"])
        if adapters:
            table.move_cursor(row=min(keep, len(adapters) - 1))
        self.plot_epsilon()
        self.plot_losses(adapters)
        self.show_lineage()
        self.show_daemon()

    def plot_epsilon(self) -> None:
        db = self.app.db
        entries = ledger.entries(db)
        spent = ledger.spent(db)
        budget = self.app.settings.privacy_budget
        left = max(0.0, budget - spent["epsilon"])
        self.query_one("#privacy-summary", Label).update(
            f"Privacy budget: ε {spent['epsilon']:.2f} spent of {budget:g} ({left:.2f} left) · "
            f"{spent['dp_runs']} private runs, {spent['non_dp_runs']} without DP")
        plot = self.query_one("#epsilon-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("ε spent, run by run, against the budget")
        total, xs, ys = 0.0, [], []
        for i, e in enumerate(entries, start=1):
            total += e["epsilon"] or 0.0
            xs.append(i)
            ys.append(total)
        if xs:
            plt.plot([0, *xs], [0.0, *ys], marker="braille", label="ε spent")
            plt.xticks(xs, [e["created"][5:10] for e in entries])
        plt.plot([0, max(len(xs), 1)], [budget, budget], color="red", marker="braille", label=f"budget {budget:g}")
        plt.xlim(0, max(len(xs), 1) + 0.3)
        plt.ylim(0, max(budget, total) * 1.1)
        plt.xlabel("runs (date)")
        plot.refresh()

    def plot_losses(self, adapters: list[dict[str, Any]]) -> None:
        plot = self.query_one("#loss-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("Training loss per step")
        for a in reversed(adapters[:4]):   # the newest few, oldest first
            curve = (a.get("eval") or {}).get("train_losses") or []
            if curve:
                plt.plot(list(range(1, len(curve) + 1)), curve, marker="braille", label=short_id(a["id"]))
        if self.live_losses:
            plt.plot(list(range(1, len(self.live_losses) + 1)), self.live_losses, marker="braille",
                     label="running now")
        plt.xlabel("step (runs of more than 100 steps: averaged)")
        plot.refresh()

    def _highlighted_adapter(self) -> str | None:
        table = self.query_one("#adapters", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @shows_errors
    def show_lineage(self) -> None:
        lineage = self.query_one("#lineage", OptionList)
        lineage.clear_options()
        adapter_id = self._highlighted_adapter()
        if adapter_id is None:
            lineage.add_option(Option("No adapter yet: Adapt now (Ctrl+A) trains one.", disabled=True))
            return
        rows = registry.learned_from(self.app.db, adapter_id)
        if not rows:
            lineage.add_option(Option("Nothing it learned from is stored any more.", disabled=True))
        for row in rows:
            lineage.add_option(Option(f"#{row['id']} {display_title(row['title'])} ({row['messages']} messages)",
                                      id=str(row["id"])))

    def show_daemon(self) -> None:
        d = activity.daemon(self.app.db)
        parts = [f"Daemon: {d['state']}" + (f" ({d['reason']})" if d.get("reason") else "")]
        if d.get("next_check"):
            parts.append(f"next check {display_time(d['next_check'])}")
        if d.get("eligible_at"):
            parts.append(f"next window from {display_time(d['eligible_at'])} if you stay away")
        if d.get("last_run"):
            parts.append(f"last run {display_time(d['last_run'])}" + (f": {d['last_result']}" if d.get("last_result") else ""))
        run = runs.current(self.app.db)
        if run is not None:
            parts.append(progress(run))
        self.query_one("#daemon-state", Label).update(" · ".join(parts))

    def poll(self) -> None:
        """Follow a running adaptation: its loss joins the live curve; a finished one refreshes all."""
        try:
            run = runs.current(self.app.db)
        except Exception:   # a database locked for a moment: the next tick reads again
            return
        if run is not None:
            if run["id"] != self._live_run:
                self._live_run, self.live_losses = run["id"], []
            if run.get("loss") is not None and run["step"] > len(self.live_losses):
                self.live_losses.append(run["loss"])
            self.plot_losses(registry.list_adapters(self.app.db))
        elif self._live_run is not None:
            self._live_run, self.live_losses = None, []
            self.refresh_all()
        self.show_daemon()

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self.show_lineage()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "adapt-now":
            self.action_adapt_now()
        elif event.button.id == "close":
            self.action_close()

    def on_option_list_option_selected(self, _event: OptionList.OptionSelected) -> None:
        self.action_forget_conversation()

    @shows_errors
    def action_forget_conversation(self) -> None:
        """Forget the highlighted conversation, after saying what that deletes and which adapters it withdraws."""
        lineage = self.query_one("#lineage", OptionList)
        if lineage.highlighted is None:
            self.notify("Highlight a conversation under “Learned from” first.", severity="warning")
            return
        option = lineage.get_option_at_index(lineage.highlighted)
        if option.id is None:
            return
        conversation_id = int(option.id)
        counts = convs.preview_delete(self.app.db, conversation_id)
        tainted = registry.trained_on_conversation(self.app.db, conversation_id)
        title = display_title(convs.get_conversation(self.app.db, conversation_id)["title"])
        what = (f"This deletes {counts['messages']} messages and {counts['memories']} memories, and withdraws "
                f"{len(tainted)} adapter{'s' if len(tainted) != 1 else ''} trained on them"
                + (f": {', '.join(tainted)}." if tainted else "."))
        self.app.push_screen(ConfirmScreen(f"Forget “{title}”?\n\n{what}"),
                             functools.partial(self._forget_answered, conversation_id))

    @shows_errors
    def _forget_answered(self, conversation_id: int, yes: bool | None) -> None:
        if not yes:
            return
        done = convs.delete_conversation(self.app.db, conversation_id)
        self.notify(f"Forgotten: {done['messages']} messages; {done['adapters_tainted']} adapters withdrawn.")
        self.refresh_all()
        chat = getattr(self.app, "chat_screen", None)
        if chat is not None:
            if chat.conversation_id == conversation_id:
                chat.open_conversation(None)
            chat.refresh_sidebar()

    def action_adapt_now(self) -> None:
        """Run `ember adapt` now, in a process of its own; its progress shows here and in the chat."""
        if self.adapting is not None and self.adapting.poll() is None:
            self.notify("An adaptation started from here is still running.", severity="warning")
            return
        if runs.current(self.app.db) is not None:
            self.notify("An adaptation is already running (the daemon's, or `ember adapt`).", severity="warning")
            return
        settings = self.app.settings
        env = dict(os.environ, EMBER_HOME=str(settings.home))
        self.adapting = subprocess.Popen(
            [sys.executable, "-m", "assistant", "adapt", "--model", str(settings.model_path)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        self.notify("Adaptation started; it runs on even if you leave this screen.")
        self.watch_adaptation(self.adapting)

    @work(thread=True, group="adapt-now")
    def watch_adaptation(self, process: subprocess.Popen) -> None:
        """Wait for the adaptation process; say how it ended (its last line on error)."""
        lines: list[str] = []

        def drain() -> None:
            for raw in process.stderr:
                line = raw.decode("utf-8", "replace").strip()
                if line and not line.startswith("\r"):
                    lines.append(line)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        code = process.wait()
        reader.join(timeout=5)
        last = next((line.split("\r")[-1] for line in reversed(lines) if line.split("\r")[-1].strip()), "")
        if code == 0:
            self.app.call_from_thread(self.notify, f"Adaptation finished. {last}".strip(), timeout=10)
        else:
            self.app.call_from_thread(self.notify, f"Adaptation did not run: {last or f'exit {code}'}",
                                      severity="error", timeout=12)
        if self.is_attached:
            self.app.call_from_thread(self.refresh_all)

    def action_close(self) -> None:
        self.dismiss(None)
