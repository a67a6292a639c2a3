"""A household in one process, without Ray: Flower's `Grid` interface delivering each message to the
device's ClientApp directly. Every message crosses as Flower's own wire format (protobuf bytes, both
ways), so sizes are what a SuperLink would carry and a device's reply is exactly what it would send;
`sent` keeps those bytes per device for inspection. A reply larger than `max_message_bytes` is refused
as a transport would refuse it; a device in `drop` never answers (it dropped mid-round).
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# gRPC's default limit in Flower's SuperLink (GRPC_MAX_MESSAGE_LENGTH, 512 MB) is far above any update here.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


@dataclasses.dataclass
class Traffic:
    """Bytes on the wire per device: down (server → device) and up (device → server), and the raw replies."""

    down: dict[int, int] = dataclasses.field(default_factory=dict)
    up: dict[int, int] = dataclasses.field(default_factory=dict)
    sent: dict[int, list[bytes]] = dataclasses.field(default_factory=dict)


class LocalGrid(Grid):
    """Flower's Grid over ClientApps in this process (node id → (ClientApp, Context))."""

    def __init__(self, nodes: dict[int, tuple[ClientApp, Context]], *, run_id: int = 1,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 drop: Callable[[int, Message], bool] | None = None):
        self.nodes, self.max_message_bytes, self.drop = nodes, max_message_bytes, drop
        self.traffic = Traffic()
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            wire = message_to_proto(msg).SerializeToString()
            self.traffic.down[node] = self.traffic.down.get(node, 0) + len(wire)
            delivered = message_from_proto(ProtoMessage.FromString(wire))
            if self.drop is not None and self.drop(node, delivered):
                continue
            app, context = self.nodes[node]
            try:
                reply = app(delivered, context)
            except Exception as err:  # a ClientApp that raised: Flower reports it as an error reply
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"),
                                reply_to=delivered)
            wire = message_to_proto(reply).SerializeToString()
            self.traffic.up[node] = self.traffic.up.get(node, 0) + len(wire)
            self.traffic.sent.setdefault(node, []).append(wire)
            if len(wire) > self.max_message_bytes:
                reply = Message(Error(ErrorCode.UNKNOWN, f"reply of {len(wire):,} bytes is over the "
                                      f"{self.max_message_bytes:,}-byte limit; refused"), reply_to=delivered)
            else:
                reply = message_from_proto(ProtoMessage.FromString(wire))
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Delivery is synchronous here: whatever did not answer by now never will (a dropped device).
        return list(self.pull_messages(self.push_messages(messages)))


def run_household(server: ServerApp, devices: dict[int, ClientApp], **grid_options: Any) -> LocalGrid:
    """Run `server` over `devices` in this process; returns the grid (its traffic) once the run ends."""
    grid = LocalGrid({node: (app, Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                                          run_config={}))
                      for node, app in devices.items()}, **grid_options)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    server(grid=grid, context=Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                      run_config={}))
    return grid
