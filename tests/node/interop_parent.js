// Node in the parent role for tests/node_interop.rs. Usage:
//   node interop_parent.js SCENARIO CHILD_PATH [ARGS...]
// Spawns the child with spawn(path, args, {stdio: [0, 1, 2, 'ipc']}) (so the child's stdout is
// ours), runs SCENARIO against it and prints one JSON line per observation: {case: ..., ...}.
// The last line is {case: 'end', code, signal, events} after the child has exited, or
// {case: 'error', error} if something went wrong. The Rust test checks the observations.
//
// With examples/interop_child as the child (it speaks the commands of interop_peer.js):
//   messages, doubles, handles, internal, crossing, parent-disconnects, child-exits
// With examples/server_child / examples/udp_child:
//   server-child, udp-child
'use strict'
process.noDeprecation = true // dgram's _handle getter warns
const { spawn } = require('child_process')
const net = require('net')
const dgram = require('dgram')
const lib = require('./interop_lib')

const [scenario, childPath, ...childArgs] = process.argv.slice(2)
const out = lib.out

setTimeout(() => {
  out({ case: 'error', error: `scenario ${scenario} timed out` })
  child.kill('SIGKILL')
  process.exit(1)
}, 30000).unref()

const child = spawn(childPath, childArgs, { stdio: [0, 1, 2, 'ipc'] })
const events = []
const inbox = []
const waiters = new Set()
child.on('message', (msg, handle) => {
  inbox.push({ msg, handle })
  for (const w of waiters) w()
})
child.on('disconnect', () => events.push('disconnect'))
const exited = new Promise((resolve) => {
  child.on('exit', (code, signal) => {
    events.push('exit')
    resolve({ code, signal })
  })
})

// The first message matching `pred`, taken out of the inbox (the others keep their order).
async function next (what, pred) {
  const deadline = Date.now() + 20000
  for (;;) {
    const i = inbox.findIndex((e) => pred(e.msg))
    if (i >= 0) return inbox.splice(i, 1)[0]
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => {
      const w = () => { waiters.delete(w); clearTimeout(t); resolve() }
      const t = setTimeout(w, 250)
      waiters.add(w)
    })
  }
}
const op = (name, id) => (m) => lib.isOp(m) && m.op === name && (id === undefined || m.id === id)
const any = () => true
const send = (msg, handle) =>
  new Promise((resolve, reject) => child.send(msg, handle, (err) => (err ? reject(err) : resolve())))

const STREAM_KINDS = ['tcp-socket', 'unix-socket', 'native-tcp-socket']
const SERVER_KINDS = ['tcp-server', 'unix-server', 'native-tcp-server']
const ALL_KINDS = [...STREAM_KINDS, ...SERVER_KINDS, 'udp4', 'udp6', 'native-udp']

function connectArgs (kind, info) {
  if (kind === 'unix-server') return info.abstract !== undefined ? ['\0' + info.abstract] : [info.path]
  return [info.port, '127.0.0.1']
}
const collectReplies = (args, n) => new Promise((resolve) => lib.collectReplies(args, n, resolve))
const udpRoundTrip = (type, address, port, payload) =>
  new Promise((resolve) => lib.udpRoundTrip(type, address, port, payload, resolve))

// Node hands a handle of `kind` to the Rust child, which serves it; our client checks the data.
async function giveToRust (kind, id) {
  const made = await new Promise((resolve) => lib.makeHandle(kind, resolve))
  const as = STREAM_KINDS.includes(kind) ? 'stream' : SERVER_KINDS.includes(kind) ? 'server' : 'dgram'
  const clientDone = made.client ? new Promise((resolve) => made.client(resolve)) : null
  await send({ op: 'take', as, id }, made.handle)
  made.afterSend() // servers and UDP sockets: close our copy, only the child serves
  const took = (await next(`took ${id}`, op('took', id))).msg
  const result = { case: `to-rust-${kind}`, took }
  if (clientDone) {
    result.clientGot = await clientDone
  } else if (SERVER_KINDS.includes(kind)) {
    result.replies = await collectReplies(connectArgs(kind, made.info), 3)
  } else {
    result.reply = await udpRoundTrip(made.info.type, made.info.address, made.info.port, 'payload')
  }
  return result
}

// The Rust child hands Node a handle of `kind` (asked for by {op:'give'}); Node serves it.
async function receiveFromRust (kind, id) {
  const { msg, handle } = await next(`given ${id}`, op('given', id))
  await next(`released ${id}`, op('released', id))
  const result = { case: `from-rust-${kind}`, given: msg, got: lib.describe(handle) }
  switch (kind) {
    case 'tcp-socket':
    case 'unix-socket':
      lib.serveStream(handle, 'node')
      result.clientGot = (await next(`client-got ${id}`, op('client-got', id))).msg.data
      break
    case 'native-tcp-socket':
      lib.serveStream(new net.Socket({ handle, readable: true, writable: true }), 'node')
      result.clientGot = (await next(`client-got ${id}`, op('client-got', id))).msg.data
      break
    case 'tcp-server':
    case 'unix-server': {
      lib.serveServer(handle, 'node')
      result.address = handle.address()
      result.replies = await collectReplies(connectArgs(kind, msg), 3)
      handle.close()
      if (msg.path) lib.unlinkQuietly(msg.path)
      break
    }
    case 'native-tcp-server': {
      const server = net.createServer()
      lib.serveServer(server, 'node')
      await new Promise((resolve) => server.listen(handle, resolve))
      result.address = server.address()
      result.replies = await collectReplies(connectArgs(kind, msg), 3)
      server.close()
      break
    }
    case 'udp4':
    case 'udp6':
      result.type = handle.type
      result.address = handle.address()
      lib.serveDgram(handle, 'node')
      result.reply = await udpRoundTrip(msg.type, msg.address, msg.port, 'payload')
      handle.close()
      break
    case 'native-udp': {
      const got = new Promise((resolve) => lib.serveRawDgram(handle, resolve))
      const c = dgram.createSocket('udp4')
      c.send('payload', msg.port, msg.address, () => c.close())
      result.datagram = await got
      handle.close()
      break
    }
  }
  return result
}

async function takeFromRust (kind, id) {
  child.send({ op: 'give', kind, id })
  return receiveFromRust(kind, id)
}

const ready = () => next('ready', op('ready'))

const scenarios = {
  // Doubles both ways, compared bit for bit in Node (Object.is tells -0 from 0).
  async doubles () {
    await ready()
    const list = [2 ** 70, 5e-324, 2 ** 53 + 1, 2 ** 53 - 1, 2 ** 53 + 2, 1e21, 1e-7, 0.1 + 0.2,
      2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308, 1 / 3,
      123456789.12345678, -1.5e-300, Math.PI * 1e100, -(2 ** 70)]
    const view = new DataView(new ArrayBuffer(8))
    let state = 0x2545f491n
    while (list.length < 2000) {
      state = (state * 6364136223846793005n + 1442695040888963407n) & 0xffffffffffffffffn
      view.setBigUint64(0, state)
      const x = view.getFloat64(0)
      if (Number.isFinite(x)) list.push(x)
    }
    child.send({ op: 'reserialize', values: list })
    const back = (await next('reserialized', op('reserialized'))).msg.values
    const changed = list.map((x, i) => [x, back[i]]).filter(([x, y]) => !Object.is(x, y))
    out({ case: 'doubles-echo', count: back.length, changed: changed.slice(0, 5), changedCount: changed.length })

    child.send({ op: 'doubles' })
    const made = (await next('doubles', op('doubles'))).msg
    const wrong = []
    made.values.forEach((x, i) => {
      view.setFloat64(0, x)
      const bits = view.getBigUint64(0).toString(16).padStart(16, '0')
      if (bits !== made.bits[i]) wrong.push([made.bits[i], bits])
    })
    out({ case: 'doubles-from-rust', count: made.values.length, wrong: wrong.slice(0, 5), wrongCount: wrong.length })
  },

  async messages () {
    await ready()
    for (const v of lib.values) child.send(v)
    const echoes = []
    for (let i = 0; i < lib.values.length; i++) echoes.push((await next('echo', any)).msg)
    out({ case: 'echo-values', echoes })

    child.send({ op: 'values' })
    const own = []
    for (;;) {
      const { msg } = await next('value', any)
      if (op('values-done')(msg)) break
      own.push(msg)
    }
    out({ case: 'own-values', values: own })

    const reps = 69906
    const big = lib.bigString(reps)
    child.send({ big })
    const echoBig = (await next('big echo', any)).msg
    out({ case: 'echo-big', equal: echoBig.big === big, bytes: Buffer.byteLength(echoBig.big || '') })
    child.send({ op: 'big', reps })
    const ownBig = (await next('own big', op('big'))).msg
    out({ case: 'own-big', equal: ownBig.value === big, bytes: Buffer.byteLength(ownBig.value || '') })

    const n = 10000
    for (let i = 0; i < n; i++) child.send({ seq: i })
    let inOrder = true
    for (let i = 0; i < n; i++) if ((await next('seq echo', any)).msg.seq !== i) inOrder = false
    out({ case: 'echo-many', count: n, inOrder })
    child.send({ op: 'many', n })
    inOrder = true
    for (let i = 0; i < n; i++) if ((await next('own seq', any)).msg.seq !== i) inOrder = false
    out({ case: 'own-many', count: n, inOrder })
  },

  async handles () {
    await ready()
    let id = 1
    for (const kind of ALL_KINDS) out(await giveToRust(kind, id++))
    for (const kind of ALL_KINDS) out(await takeFromRust(kind, id++))
  },

  async internal () {
    await ready()
    child.send({ cmd: 'NODE_CUSTOM', x: 1 })
    child.send({ op: 'report' })
    const report = (await next('report', op('report'))).msg
    out({ case: 'internal-to-rust', received: report.received, internal: report.internal })
    child.send({ op: 'try-reserved' })
    const seen = []
    for (;;) {
      const { msg } = await next('reserved-result', any)
      seen.push(msg)
      if (op('reserved-result')(msg)) break
    }
    out({ case: 'reserved-from-rust', seen })
  },

  async crossing () {
    await ready()
    const n = 10
    child.send({ op: 'give-many', kind: 'tcp-socket', n, base: 100 })
    const toRust = []
    const fromRust = []
    for (let i = 0; i < n; i++) {
      toRust.push(giveToRust('tcp-socket', i))
      fromRust.push(receiveFromRust('tcp-socket', 100 + i))
    }
    const sent = await Promise.all(toRust)
    const received = await Promise.all(fromRust)
    out({
      case: 'crossing',
      toRust: sent.map((r) => ({ handleType: r.took.handleType, clientGot: r.clientGot })),
      fromRust: received.map((r) => ({ got: r.got, clientGot: r.clientGot }))
    })
  },

  async 'parent-disconnects' () {
    await ready()
    child.disconnect()
    const { code, signal } = await exited
    out({ case: 'end', code, signal, events })
    process.exit(0)
  },

  async 'child-exits' () {
    await ready()
    child.send({ op: 'exit' })
    const { code, signal } = await exited
    // 'disconnect' normally comes first; give it a moment if not.
    for (let i = 0; i < 40 && !events.includes('disconnect'); i++) await new Promise((resolve) => setTimeout(resolve, 50))
    out({ case: 'end', code, signal, events })
    process.exit(0)
  },

  async 'server-child' () {
    const server = net.createServer({ pauseOnConnect: true })
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
    const port = server.address().port
    await send('server', server)
    server.close() // only the child serves
    const replies = await collectReplies([port, '127.0.0.1'], 3)
    out({ case: 'server-child', pid: child.pid, replies })
  },

  async 'udp-child' () {
    const socket = dgram.createSocket('udp4')
    await new Promise((resolve) => socket.bind(0, '127.0.0.1', resolve))
    const { address, port } = socket.address()
    await send('udp', socket)
    socket.close() // only the child answers
    const replies = []
    for (const p of ['one', 'two', 'three']) replies.push(await udpRoundTrip('udp4', address, port, p))
    out({ case: 'udp-child', pid: child.pid, replies })
  }
}

async function main () {
  const run = scenarios[scenario]
  if (!run) throw new Error(`unknown scenario ${scenario}`)
  await run()
  child.disconnect()
  const { code, signal } = await exited
  out({ case: 'end', code, signal, events })
  process.exit(0)
}

main().catch((e) => {
  out({ case: 'error', error: String(e && e.stack ? e.stack : e) })
  child.kill('SIGKILL')
  process.exit(1)
})
