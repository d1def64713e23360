"""Plays the contacts of the real-protocol tests: Telethon clients on the local
MTProto server, driven by one JSON request per line on stdin, one JSON answer
per line on stdout.

    MTPROTO_DEST=... MTPROTO_PORT=... PYTHONPATH=<shared/mtproto-server> python contacts.py

Requests ({"op": ..., ...}) and what they answer:
    add      name, session        -> user id; the contact is connected
    send     name, to, text       -> id of the sent message (to: a username)
    history  name, peer, limit    -> messages with peer, oldest first:
                                     [{"id", "out", "text", "date"}]
    read_max name, peer           -> the highest id of ours that peer has read
    find_me_by_phone name         -> lets anybody find this contact by its number
Errors answer {"error": "..."}; the driver goes on.
"""
import asyncio
import json
import sys

from telethon import functions, types

import tg

clients = {}


async def add(name, session):
    c = tg.client(session)
    await c.connect()
    me = await c.get_me()
    clients[name] = c
    return me.id


async def history(name, peer, limit=50):
    msgs = await clients[name].get_messages(peer, limit=limit)
    return [{"id": m.id, "out": m.out, "text": m.message or "", "date": int(m.date.timestamp())}
            for m in reversed(msgs)]


async def read_max(name, peer):
    c = clients[name]
    entity = await c.get_input_entity(peer)
    r = await c(functions.messages.GetPeerDialogsRequest(peers=[types.InputDialogPeer(entity)]))
    return r.dialogs[0].read_outbox_max_id if r.dialogs else 0


async def find_me_by_phone(name):
    await clients[name](functions.account.SetPrivacyRequest(
        key=types.InputPrivacyKeyAddedByPhone(), rules=[types.InputPrivacyValueAllowAll()]))
    return True


async def handle(req):
    op = req["op"]
    if op == "add":
        return await add(req["name"], req["session"])
    if op == "send":
        m = await clients[req["name"]].send_message(req["to"], req["text"])
        return m.id
    if op == "history":
        return await history(req["name"], req["peer"], req.get("limit", 50))
    if op == "read_max":
        return await read_max(req["name"], req["peer"])
    if op == "find_me_by_phone":
        return await find_me_by_phone(req["name"])
    raise ValueError(f"unknown op {op!r}")


async def main():
    tg.configure()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        try:
            answer = {"result": await asyncio.wait_for(handle(json.loads(line)), 30)}
        except Exception as e:  # one bad request must not end the driver
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
    for c in clients.values():
        await c.disconnect()


asyncio.run(main())
