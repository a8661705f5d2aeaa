// Node's own cluster primary running a worker binary (any program: a Rust one here), the way
// `cluster.setupPrimary({ exec })` with `execPath` allows. Usage:
//   node cluster_primary.js rr|none WORKERS WORKER_PATH
// Forks WORKERS workers of WORKER_PATH with PORT=0, prints one JSON line per event
// ({event: 'listening', id, port} ...), then {event: 'ready', port} once all listen, and on a
// "disconnect" line on stdin disconnects every worker and prints {event: 'exit', id, code, signal}
// for each, then {event: 'done'}.
'use strict'
const [policy, workers, workerPath] = process.argv.slice(2)
process.env.NODE_CLUSTER_SCHED_POLICY = policy
const cluster = require('cluster')
const readline = require('readline')

const out = (o) => console.log(JSON.stringify(o))
cluster.setupPrimary({ exec: workerPath, execArgv: [], args: [] })
// Node forks `process.execPath exec args`: make the worker binary the program itself.
process.execPath = workerPath
const ports = new Set()
let listening = 0
cluster.on('online', (w) => out({ event: 'online', id: w.id, pid: w.process.pid }))
cluster.on('listening', (w, address) => {
  out({ event: 'listening', id: w.id, port: address.port })
  ports.add(address.port)
  if (++listening === Number(workers)) out({ event: 'ready', port: address.port, ports: [...ports] })
})
let exited = 0
cluster.on('exit', (w, code, signal) => {
  out({ event: 'exit', id: w.id, code, signal, exitedAfterDisconnect: w.exitedAfterDisconnect })
  if (++exited === Number(workers)) out({ event: 'done' })
})
for (let i = 0; i < Number(workers); i++) cluster.fork({ PORT: '0', HOST: '127.0.0.1' })
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'disconnect') cluster.disconnect()
})
setTimeout(() => { out({ event: 'timeout' }); process.exit(1) }, 30000).unref()
