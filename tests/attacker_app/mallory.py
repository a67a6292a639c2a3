"""An app someone on the household's network submits to its SuperLink: on a device, its ClientApp leaves a
mark in the data directory; its ServerApp (which Flower runs on the server) writes what the devices replied."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    Path(str(context.node_config["ember-home"]), "attacker-ran-here").write_text("the attacker's code ran")
    return Message(RecordDict({"taken": ConfigRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    Path(str(context.run_config["out"]) + ".started").write_text("the attacker's ServerApp ran")
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    messages = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
                for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=180))
    Path(str(context.run_config["out"])).write_text(json.dumps(
        [r.error.code if r.has_error() else "ran" for r in replies]))
