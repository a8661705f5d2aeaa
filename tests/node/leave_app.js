// A worker that leaves on its own at once (`cluster.worker.disconnect()`), every time: the
// primary must not restart it in a tight loop.
'use strict'
require('cluster').worker.disconnect()
