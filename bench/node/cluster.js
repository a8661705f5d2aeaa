// The cluster in Node.
//   node cluster.js primary rr|shared   Node's own cluster primary with two workers running
//                                       `cluster.js worker`
//   node cluster.js worker              an unchanged net app: answers each connection with the
//                                       seed's reply and closes it; listens on $PORT (set by a
//                                       handoff primary) or 0 (Node's primary shares one port)
// The primary prints BENCH {"role":"seed-ready","addr":...,"pids":[primary, workers...]} once
// both workers listen.
'use strict'
const cluster = require('cluster')
const net = require('net')
const { emit, dieWithParent } = require('./common')

const REPLY = 'Child handled it.'
const WORKERS = 2

if (cluster.isPrimary && process.argv[2] === 'primary') {
  dieWithParent()
  const mode = process.argv[3]
  if (mode !== 'rr' && mode !== 'shared') {
    console.error('cluster.js: primary rr|shared')
    process.exit(2)
  }
  cluster.schedulingPolicy = mode === 'rr' ? cluster.SCHED_RR : cluster.SCHED_NONE
  cluster.setupPrimary({ exec: __filename, args: ['worker'] })
  let listening = 0
  for (let i = 0; i < WORKERS; i++) cluster.fork()
  cluster.on('listening', (worker, address) => {
    listening++
    if (listening === WORKERS) {
      const pids = [process.pid].concat(Object.values(cluster.workers).map((w) => w.process.pid))
      emit('seed-ready', { addr: '127.0.0.1:' + address.port, pids })
    }
  })
  cluster.on('exit', (worker, code, signal) => {
    console.error(`cluster.js: worker ${worker.process.pid} exited (${signal || code})`)
    process.exit(1)
  })
} else {
  dieWithParent() // whatever the primary: no worker outlives a killed run
  net.createServer((socket) => socket.end(REPLY)).listen(Number(process.env.PORT || 0), '127.0.0.1')
}
