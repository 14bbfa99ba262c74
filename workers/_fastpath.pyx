# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The UDP packet path's common case, compiled: what ``udp.serve`` and
``Upstream.serve`` do for an ordinary query and its reply, without the
interpreter in the loop.

The pure-Python modules stay the reference: this one does the same thing
for the packets it takes and hands every other packet, unchanged, to the
Python code (``Forwarder.handle`` on the client side, ``Forwarder.reply`` on
the reply side). Timeouts, retries, ICMP errors, SERVFAIL, the router's own
answers and TCP never come here.

What it takes: a query of at least 12 bytes that is not a response, opcode
QUERY, QDCOUNT 1, an uncompressed question name of at most 255 bytes whose
type and class are there, not AXFR or IXFR, while the worker has no ACL and
no query log, whose route is a pool of members that all get the query as it
is (``client_address = none``). A reply: from the member asked, with our ID
and the question asked, to a UDP client whose query was not changed.

Each packet handed to the Python code is counted by why
(``HANDOFF_REASONS``, ``dnsrouter_fast_path_handoffs_total``): a worker
whose ACL or query log sends every query there shows it.

The contract with the Python modules: this one reads and calls only their
public names (``Forwarder.handle``, ``upstreams``, ``upstreams_for``,
``rtos``, ``matcher``, ``allowed``, ``query_log``, ``timeout``;
``Pool.rotation``, ``modes``, ``backends``; ``Upstream.pending``,
``waiting``, ``limit``, ``fd``, ``sock``, ``policy``, ``counts``, ``tick``,
``errors``, ``retry``, ``closing``; the policy's ``rtts``, ``rtos``,
``last_answered``, ``retry_min``, ``timeout``, ``answered``, ``reply``),
which tests/test_fastpath_seam.py holds it to, and it takes every constant
it shares with them (batch and slot sizes, stale errnos, RTT gains, the
escape table, counter keys) from them at import.

Safety: every length read from a packet is checked against the datagram's
length before the byte it counts is read; the datagrams live in slots of
64 KiB (the largest UDP payload fits), and the parse of a question never
writes more than ``KEY`` bytes.
"""
from cpython cimport array
import array
import collections
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memcmp, memset, strerror
from libc.errno cimport errno, EINTR
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_DelItem

# The C declarations. Included, not found by name: Cython looks for a
# module's own .pxd by its dotted name (dnsrouter/workers/_fastpath.pxd),
# which no directory of the checkout spells (package_dir in setup.cfg).
include "_fastpath.pxd"

# The rules and sizes this module shares with the Python path, read from
# there. The Python API is typed in _fastpath.pyi.
from dnsrouter import counters as _counters, wire
from dnsrouter.control import LATENCY_BUCKETS
from dnsrouter.workers import mmsg, rtt
from dnsrouter.workers.upstream import TICK

cdef int _batch = mmsg.BATCH  # datagrams per call, either way
cdef size_t _slot = mmsg.MAX_DATAGRAM  # room per received datagram
if not 1 <= _batch <= OUT:
    raise ImportError(f"mmsg.BATCH must be within 1..{OUT}")
cdef double _tick = TICK  # the upstreams' clocks
cdef double _ALPHA = rtt.ALPHA, _BETA = rtt.BETA, _K = rtt.K  # RFC 6298's gains, as Rtt.sample uses them
_deque = collections.deque  # of the retry queues
_raw_address = mmsg.raw_address
_peer_key = mmsg.peer_key
_name_to_text = wire.name_to_text

BUILT = True  # what the loader checks
cdef object _UNSET = object()  # no value yet, where None is a value


# mmsg.STALE_ERRORS as a table: an ICMP error taken by this send, meant for an earlier one.
cdef bint _STALE[ERRNOS]
memset(_STALE, 0, sizeof(_STALE))
for _e in mmsg.STALE_ERRORS:
    if not 0 < _e < ERRNOS:
        raise ImportError(f"errno {_e} is past the table of stale errnos")
    _STALE[_e] = True


cdef inline bint _stale(int e) noexcept nogil:
    return 0 < e < ERRNOS and _STALE[e]


cdef inline double _monotonic() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)  # what time.monotonic reads on Linux
    return t.tv_sec + t.tv_nsec * 1e-9


cdef int _classify(const unsigned char *p, Py_ssize_t n, unsigned char *key) noexcept nogil:
    """For a query the compiled path takes: the end of its question, with the
    question (name, type, class) lower-cased into ``key``; else -1, and the
    Python path decides (and counts) what the packet gets."""
    cdef Py_ssize_t pos = 12, label
    cdef int qtype
    if n < 12 or p[2] & 0xF8 or p[4] or p[5] != 1:  # a response, an opcode, QDCOUNT
        return -1
    while True:
        if pos >= n:
            return -1
        label = p[pos]
        if label == 0:
            pos += 1
            break
        if label > 63:
            return -1
        pos += label + 1
        if pos - 12 >= 255:  # wire.parse_question: at most 255 bytes of name, the root label's included
            return -1
    if pos + 4 > n:
        return -1
    qtype = p[pos] << 8 | p[pos + 1]
    if qtype == 251 or qtype == 252:  # IXFR, AXFR: refused by the Python path
        return -1
    pos += 4
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(pos - 16):  # the name as bytes.lower() has it: ASCII letters only
        c = p[12 + i]
        key[i] = c + 32 if 65 <= c <= 90 else c
    memcpy(key + pos - 16, p + pos - 4, 4)  # type and class as they are: 65 is no 97
    return <int>pos


cdef inline bint _same_question(const unsigned char *p, const unsigned char *q, Py_ssize_t n) noexcept nogil:
    """Whether the question at ``p`` is ``q`` (a key of ``n`` bytes from _classify)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n - 4):
        c = p[i]
        if (c + 32 if 65 <= c <= 90 else c) != q[i]:
            return False
    return memcmp(p + n - 4, q + n - 4, 4) == 0


# What wire.name_to_text writes as it is (wire.PLAIN); any other byte is escaped there.
cdef bint _PLAIN[256]
memset(_PLAIN, 0, sizeof(_PLAIN))
for _c in wire.PLAIN:
    _PLAIN[_c] = True


cdef object _route(RouteCache cache, const unsigned char *key, Py_ssize_t n):
    """``matcher.lookup`` for the lower-cased wire name ``key`` (``n`` bytes,
    the root label's included): the text made here and one pass of the
    matcher's RE2 set, the first registered pool with a usable backend. A
    flood of names never seen (random subdomains) costs this, not a round
    through the interpreter. Names that need escaping, and the root, take the
    Python matcher."""
    cdef unsigned char text[256]  # a wire name of at most 255 bytes has as many characters, less one
    cdef Py_ssize_t pos = 0, out = 0, label, i, best = -1, index
    if key[0] == 0:
        return cache.matcher.lookup(_name_to_text(PyBytes_FromStringAndSize(<char *>key, n)))
    while key[pos]:
        label = key[pos]
        for i in range(pos + 1, pos + 1 + label):
            if not _PLAIN[key[i]]:
                return cache.matcher.lookup(_name_to_text(PyBytes_FromStringAndSize(<char *>key, n)))
            text[out] = key[i]
            out += 1
        text[out] = 46  # '.'
        out += 1
        pos += label + 1
    if cache.match is None:
        return None
    pools = cache.pools  # Matcher.lookup: the lowest index whose pool has a backend
    for found in cache.match(PyBytes_FromStringAndSize(<char *>text, out)) or ():
        index = found
        if (best < 0 or index < best) and pools[index].backends:
            best = index
    return pools[best] if best >= 0 else None


cdef class RouteCache:
    """The pool of each recent question, for one compiled thread: a table in
    C of SETS sets of WAYS entries, keyed by the lower-cased question (name,
    type, class), holding the question's bytes (which every Pending entry of
    it shares) and the pool the matcher picked. A hit makes no object and
    touches no dict; a miss (a flood of random names) replaces an entry in
    its set, one bytes object made and one freed, where a dict would grow
    and be cleared whole. Entries hold for one matcher: a new route table
    or new health empties the cache. About 0.4 MB, plus the questions held
    (up to 16,384)."""

    cdef _Way *ways
    cdef object matcher  # the table the entries were found in
    cdef object match, pools  # its match_bytes (None: no route) and pools, for _route
    cdef unsigned int victim  # which way a full set gives up next, in turn

    def __cinit__(self):
        self.ways = <_Way *>calloc(SETS * WAYS, sizeof(_Way))
        if self.ways == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.ways != NULL:
            self.clear()
            free(self.ways)

    cdef void clear(self) noexcept:
        cdef int i
        for i in range(SETS * WAYS):
            Py_XDECREF(self.ways[i].question)
            Py_XDECREF(self.ways[i].pool)
            self.ways[i].question = self.ways[i].pool = NULL

    cdef inline int use(self, matcher) except -1:
        """Entries from this matcher only (read once a batch)."""
        if matcher is not self.matcher:
            self.clear()
            self.matcher = matcher
            self.match = matcher.match_bytes if matcher.routes else None
            self.pools = matcher.pools
        return 0

    cdef _Way *find(self, const unsigned char *key, Py_ssize_t n, Py_hash_t hash) except NULL:
        """The entry of question ``key`` (``n`` bytes from _classify, its hash
        ``hash``), found or made."""
        cdef _Way *ways = self.ways + (<size_t>hash & (SETS - 1)) * WAYS
        cdef _Way *way
        cdef int i
        for i in range(WAYS):
            way = ways + i
            if (way.hash == hash and way.question != NULL and PyBytes_GET_SIZE(<object>way.question) == n
                    and memcmp(PyBytes_AS_STRING(<object>way.question), key, n) == 0):
                return way
        question = PyBytes_FromStringAndSize(<char *>key, n)
        pool = _route(self, key, n - 4)
        for i in range(WAYS):
            if ways[i].question == NULL:
                way = ways + i
                break
        else:
            way = ways + self.victim % WAYS
            self.victim += 1
        Py_XDECREF(way.question)
        Py_XDECREF(way.pool)
        way.hash = hash
        way.question, way.pool = <PyObject *>question, <PyObject *>pool
        Py_INCREF(way.question)
        Py_INCREF(way.pool)
        return way

    def lookup(self, matcher, bytes question):
        """(question, pool) for a lower-cased question, as ``serve`` looks it
        up, for the tests: the question object is the cached one on a hit."""
        cdef Py_ssize_t pos = 0, n = PyBytes_GET_SIZE(question)
        while pos < n - 4 and question[pos]:  # _route reads a well-formed name only, as _classify leaves it
            pos += question[pos] + 1
        if pos != n - 5 or n - 4 > 255:
            raise ValueError("not a question")
        cdef const unsigned char *key = <const unsigned char *>PyBytes_AS_STRING(question)
        self.use(matcher)
        cdef _Way *way = self.find(key, n, _Py_HashBytes(key, n))
        return <object>way.question, <object>way.pool


def classify(bytes packet):
    """The compiled check of one query, for the tests: (end, lower-cased
    question) or None when the Python path takes the packet."""
    cdef unsigned char key[KEY]
    cdef int end = _classify(<const unsigned char *>PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet), key)
    if end < 0:
        return None
    return end, PyBytes_FromStringAndSize(<char *>key, end - 12)


cdef class Receiver:
    """Blocking reads of up to ``mmsg.BATCH`` datagrams from one socket
    (``mmsg.Receiver``, with the GIL released while the thread waits)."""

    cdef object _sock
    cdef int fd
    cdef int name_size
    cdef int flags
    cdef unsigned int n
    cdef unsigned char *buffer
    cdef unsigned char *names
    cdef iovec *iov
    cdef mmsghdr *hdrs

    def __cinit__(self, sock, unsigned int n=0, bint wait=True):  # n=0: mmsg.BATCH
        self._sock = sock  # keeps the descriptor open while we use its number
        self.fd = sock.fileno()
        # wait=False: what is there now, EAGAIN if nothing (a socket epoll said is readable)
        self.flags = MSG_WAITFORONE if wait else MSG_DONTWAIT
        self.name_size = NAME if sock.family == AF_INET6 else 16
        self.n = min(n, <unsigned int>_batch) if n else <unsigned int>_batch
        # malloc of 2 MiB maps anonymous memory: a slot's pages are backed only once touched
        self.buffer = <unsigned char *>malloc(<size_t>self.n * _slot)
        self.names = <unsigned char *>malloc(<size_t>self.n * NAME)
        self.iov = <iovec *>calloc(self.n, sizeof(iovec))
        self.hdrs = <mmsghdr *>calloc(self.n, sizeof(mmsghdr))
        if self.buffer == NULL or self.names == NULL or self.iov == NULL or self.hdrs == NULL:
            raise MemoryError()
        cdef unsigned int i
        for i in range(self.n):
            self.iov[i].iov_base = self.buffer + <size_t>i * _slot
            self.iov[i].iov_len = _slot
            self.hdrs[i].msg_hdr.msg_name = self.names + i * NAME
            self.hdrs[i].msg_hdr.msg_iov = &self.iov[i]
            self.hdrs[i].msg_hdr.msg_iovlen = 1

    def __dealloc__(self):
        free(self.buffer)
        free(self.names)
        free(self.iov)
        free(self.hdrs)

    cdef int wait(self) except -1:
        """The number of datagrams read; OSError (EINTR included) on failure."""
        cdef int got, error = 0
        cdef unsigned int i
        with nogil:
            for i in range(self.n):
                self.hdrs[i].msg_hdr.msg_namelen = self.name_size
            got = recvmmsg(self.fd, self.hdrs, self.n, self.flags, NULL)
            if got < 0:
                error = errno
        if got < 0:
            raise OSError(error, strerror(error).decode())
        return got

    cdef inline const unsigned char *data(self, int i) noexcept nogil:
        return self.buffer + <size_t>i * _slot

    cdef inline Py_ssize_t length(self, int i) noexcept nogil:
        return self.hdrs[i].msg_len

    cdef inline bytes payload(self, int i):
        return PyBytes_FromStringAndSize(<char *>self.data(i), self.hdrs[i].msg_len)

    cdef inline bytes peer(self, int i):
        return PyBytes_FromStringAndSize(<char *>self.names + i * NAME, self.name_size)

    def receive(self):
        """As ``mmsg.Receiver.receive``: [(payload, raw peer address)]."""
        cdef int got = self.wait(), i
        return [(self.payload(i), self.peer(i)) for i in range(got)]


cdef class Outbox:
    """What one thread sends during one batch (``mmsg.Outbox``): the
    payloads are not copied, the iovecs point into the bytes objects, which
    the outbox holds until they are sent, or into a Receiver's slots
    (``add_from``: a forwarded query or reply goes out of the slot it came
    in, its ID rewritten in place)."""

    cdef public int pick  # which upstream socket this batch's queries leave from
    cdef int count
    cdef list _held
    cdef int fds[OUT]
    cdef unsigned char names[OUT][NAME]
    cdef iovec iov[OUT]
    cdef mmsghdr hdrs[OUT]
    cdef unsigned short ids[IDS]
    cdef int next_id

    def __cinit__(self):
        self._held = []
        self.count = 0
        self.next_id = IDS
        memset(self.hdrs, 0, sizeof(self.hdrs))
        self.pick = self.random_id()

    cdef int random_id(self) except -1:
        """An unpredictable 16-bit number from the kernel, drawn in batches."""
        if self.next_id >= IDS:
            if getrandom(self.ids, sizeof(self.ids), 0) != sizeof(self.ids):
                raise OSError(errno, "getrandom failed")
            self.next_id = 0
        self.next_id += 1
        return self.ids[self.next_id - 1]

    cpdef add(self, int fd, bytes payload, bytes name):
        self.add_from(fd, <unsigned char *>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                      <const unsigned char *>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        self._held.append(payload)

    cdef int add_from(self, int fd, unsigned char *data, Py_ssize_t size, const unsigned char *name,
                      Py_ssize_t name_size) except -1:
        """As ``add``, of a datagram in a Receiver's slot, not copied: the
        slot must stay as it is until the flush, which every loop here does
        before its receiver reads again."""
        if name_size > NAME:
            raise ValueError("not a socket address")
        if self.count == OUT:
            self.flush()
        cdef int i = self.count
        self.fds[i] = fd
        memcpy(self.names[i], name, name_size)
        self.iov[i].iov_base = data
        self.iov[i].iov_len = size
        self.hdrs[i].msg_hdr.msg_name = self.names[i]
        self.hdrs[i].msg_hdr.msg_namelen = <socklen_t>name_size
        self.hdrs[i].msg_hdr.msg_iov = &self.iov[i]
        self.hdrs[i].msg_hdr.msg_iovlen = 1
        self.count = i + 1
        return 0

    cpdef flush(self):
        cdef int count = self.count
        if count == 0:
            return
        with nogil:
            _send_grouped(self.fds, self.hdrs, count)
        self.count = 0
        del self._held[:]
        self.pick = self.random_id()


cdef void _send_grouped(int *fds, mmsghdr *hdrs, int count) noexcept nogil:
    """Each socket's datagrams in sendmmsg calls of up to mmsg.BATCH, in
    order; a datagram the kernel refuses is lost, as a datagram may be."""
    cdef mmsghdr run[OUT]  # mmsg.BATCH is at most OUT (checked at import)
    cdef bint sent[OUT]
    cdef int start, i, n, fd
    memset(sent, 0, sizeof(sent))
    for start in range(count):
        if sent[start]:
            continue
        fd = fds[start]
        n = 0
        for i in range(start, count):
            if not sent[i] and fds[i] == fd:
                run[n] = hdrs[i]
                sent[i] = True
                n += 1
                if n == _batch:
                    _send_run(fd, run, n)
                    n = 0
        if n:
            _send_run(fd, run, n)


cdef void _send_run(int fd, mmsghdr *run, int n) noexcept nogil:
    cdef int done = 0, again = -1, got
    cdef msghdr *h
    if n == 1:  # light traffic: one datagram, one sendto
        h = &run[0].msg_hdr
        if sendto(fd, h.msg_iov.iov_base, h.msg_iov.iov_len, 0, h.msg_name, h.msg_namelen) < 0 and _stale(errno):
            sendto(fd, h.msg_iov.iov_base, h.msg_iov.iov_len, 0, h.msg_name, h.msg_namelen)
        return
    while done < n:
        got = sendmmsg(fd, run + done, n - done, 0)
        if got > 0:
            done += got
        elif again != done and _stale(errno):
            again = done  # an earlier datagram's error: this one once more
        else:
            done += 1


cdef inline void _count(object counts, object key, long n=1):
    """``counts[key] += n`` for a defaultdict(int) (Counts)."""
    cdef PyObject *old = PyDict_GetItem(counts, key)
    counts[key] = (<object>old if old != NULL else 0) + n


_key = _counters.key  # a kind not declared in dnsrouter.counters fails the import
_FIXED_KEYS = (_key("ignored_replies", "short"), _key("ignored_replies", "unknown_id"),
               _key("ignored_replies", "wrong_source"), _key("ignored_replies", "wrong_question"),
               _key("dropped", "in_flight_limit"), _key("dropped", "error"), _key("queries", "udp"))
# Why the compiled loop hands a query to Python (Forwarder.handle), in the order of the enum in the .pxd.
HANDOFF_REASONS = ("not_simple", "acl", "query_log", "no_route", "client_address")
_HANDOFF_KEYS = tuple(_key("fast_path_handoffs", reason) for reason in HANDOFF_REASONS)
if len(_FIXED_KEYS) != FIXED or len(HANDOFF_REASONS) != REASONS:  # snapshot reads the keys unchecked
    raise ImportError("the counter keys and their indexes in _fastpath.pxd differ")


cdef class Counters:
    """What one thread of the compiled path counts per packet, in C: no
    tuple, no hash, no dict per count. The stats reporter reads them
    (``Stats.add``) as totals keyed as the Python path's counts, so
    ``/metrics`` shows the same numbers either way; it reads them under
    the GIL, which the counting thread holds whenever it counts."""

    cdef long long fixed[FIXED]
    cdef long long handoffs[REASONS]
    cdef long long responses[RCODES]
    cdef long long buckets[BUCKETS]
    cdef int nbuckets
    cdef double latency_sum
    cdef long long backend_queries[BACKENDS]
    cdef long long late_replies[BACKENDS]
    cdef dict slots  # backend -> its index in the two arrays above
    cdef list backends

    def __cinit__(self, int latency_buckets=0):  # 0: a thread that times no reply
        if not 0 <= latency_buckets < BUCKETS:
            raise ValueError("too many latency buckets")
        self.nbuckets = latency_buckets + 1
        self.slots = {}
        self.backends = []

    cdef inline int slot(self, backend):
        """The backend's index; -1 once BACKENDS are taken."""
        cdef PyObject *found = PyDict_GetItem(self.slots, backend)
        if found != NULL:
            return <int>(<object>found)
        cdef int i = len(self.backends)
        if i == BACKENDS:
            return -1
        self.backends.append(backend)
        self.slots[backend] = i
        return i

    def snapshot(self):
        """{(kind, label): total since the start}, counts of 0 left out."""
        cdef int i
        out = {}
        for i in range(FIXED):
            if self.fixed[i]:
                out[_FIXED_KEYS[i]] = self.fixed[i]
        for i in range(REASONS):
            if self.handoffs[i]:
                out[_HANDOFF_KEYS[i]] = self.handoffs[i]
        for i in range(RCODES):
            if self.responses[i]:
                out["responses", i] = self.responses[i]
        for i in range(self.nbuckets):
            if self.buckets[i]:
                out["latency_bucket", i] = self.buckets[i]
        if self.latency_sum:
            out["latency_sum", ""] = self.latency_sum
        for i, backend in enumerate(self.backends):
            if self.backend_queries[i]:
                out["backend_queries", backend] = self.backend_queries[i]
            if self.late_replies[i]:
                out["late_replies", backend] = self.late_replies[i]
        return out


# -- the client side -----------------------------------------------------------

cdef class Pending:
    """``upstream.Pending`` as a C struct: one query waiting for a backend's
    reply. The forwarder makes its entries of this class while the fast path
    runs (``Forwarder.Pending``), so that the compiled loops read and write
    the fields without a look-up; Python code uses them as it uses
    upstream.Pending's slots, which these fields repeat one for one (see
    there for what each means)."""

    cdef public object client, addr, pool, backend, retry_backend, variants, ecs_added
    cdef public bytes query, question
    cdef public bint strip_opt, tcp, done
    cdef public double sent, retry_at, retry_sent
    cdef public int uid, retry_uid

    def __init__(self, client, addr, bytes query, bytes question, pool, backend, bint strip_opt, bint tcp):
        _fill(self, client, addr, query, question, pool, backend)
        self.strip_opt = strip_opt
        self.tcp = tcp


cdef inline Pending _fill(Pending entry, client, addr, bytes query, bytes question, pool, backend):
    entry.client = client
    entry.addr = addr
    entry.query = query
    entry.question = question
    entry.pool = pool
    entry.backend = backend
    entry.uid = -1
    entry.retry_backend = backend
    entry.retry_uid = -1
    return entry  # the rest as __new__ leaves it: 0, False, None


cdef class _Queries:
    """The client side of one listening socket (``udp.serve``'s batch,
    compiled): its receiver and what its loop reads of the forwarder."""

    cdef Receiver receiver
    cdef object forwarder, counts, stopping, client, failed, handle
    cdef dict upstreams, rtos  # the forwarder's tables: filled in place, never replaced
    cdef Counters counters
    cdef dict peers
    cdef RouteCache routes
    # Per datagram of a batch: the end of its question (or -1), the question's hash, the question lower-cased.
    cdef int *ends
    cdef Py_hash_t *hashes
    cdef unsigned char *keys

    def __cinit__(self, sock, forwarder, counts, Counters counters, stopping, client, failed):
        self.receiver = Receiver(sock, wait=False)
        self.forwarder = forwarder
        self.counts = counts
        self.counters = counters
        self.stopping = stopping
        self.client = client
        self.failed = failed
        self.handle = forwarder.handle
        self.upstreams, self.rtos = forwarder.upstreams, forwarder.rtos
        self.peers = {}  # backend -> (raw address, family), for the worker's few backends
        self.routes = RouteCache()
        cdef size_t n = self.receiver.n
        self.ends = <int *>malloc(n * sizeof(int))
        self.hashes = <Py_hash_t *>malloc(n * sizeof(Py_hash_t))
        self.keys = <unsigned char *>malloc(n * KEY)
        if self.ends == NULL or self.hashes == NULL or self.keys == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.ends)
        free(self.hashes)
        free(self.keys)

    cdef bint take(self, Outbox outbox) except -1:
        """Forward what waits on the socket (a batch at most); False once the
        socket is shut down and drained."""
        cdef Receiver receiver = self.receiver
        cdef Counters counters = self.counters
        cdef int got, i, end, uid, taken = 0, slot, fd = -1
        cdef Py_ssize_t limit = 0
        cdef unsigned char *slot_data
        cdef Py_ssize_t length
        cdef PyObject *found
        cdef _Way *way
        cdef double now
        cdef Pending entry
        try:
            got = receiver.wait()
        except OSError as e:  # EAGAIN: nothing there (a read of a socket shut down does not say so)
            return e.errno == EINTR or not self.stopping.is_set()
        with nogil:
            for i in range(got):
                end = self.ends[i] = _classify(receiver.data(i), receiver.length(i), self.keys + i * KEY)
                if end >= 0:
                    self.hashes[i] = _Py_HashBytes(self.keys + i * KEY, end - 12)
        forwarder = self.forwarder
        handle = self.handle
        client = self.client
        counts = self.counts
        peers = self.peers
        # Read once a batch: a new table or setting takes effect from the next batch.
        self.routes.use(forwarder.matcher)
        # Every query goes to Python while the worker has an ACL or logs queries (counted: see HANDOFF_REASONS).
        python_only = ACL if forwarder.allowed is not None else QUERY_LOG if forwarder.query_log else -1
        by_family = self.upstreams
        rtos = self.rtos
        last_pool = last_upstream = _UNSET  # None is a pool (no route) and gets its check
        cycle = pending = waiting_by = None
        for i in range(got):
            length = receiver.length(i)
            data = receiver.payload(i)
            addr = receiver.peer(i)
            end = self.ends[i]
            if end < 0 or python_only >= 0:
                counters.handoffs[NOT_SIMPLE if end < 0 else python_only] += 1
                handle(data, addr, client, counts, outbox=outbox)
                continue
            try:
                way = self.routes.find(self.keys + i * KEY, end - 12, self.hashes[i])
                question, pool = <object>way.question, <object>way.pool  # ours: a later miss may reuse the way
                if pool is not last_pool:  # a batch is mostly one pool's: its attributes read once
                    if pool is None or pool.modes:  # SERVFAIL, or a member that learns the client's address
                        counters.handoffs[NO_ROUTE if pool is None else CLIENT_ADDRESS] += 1
                        handle(data, addr, client, counts, outbox=outbox)
                        continue
                    last_pool, cycle = pool, pool.rotation
                taken += 1
                backend = next(cycle)  # Pool.next
                found = PyDict_GetItem(peers, backend)
                if found == NULL:
                    if len(peers) >= BACKENDS:
                        peers.clear()  # backends come and go over months: bounded
                    peers[backend] = peer = (_raw_address(backend), backend.family)
                else:
                    peer = <tuple>found
                found = PyDict_GetItem(by_family, peer[1])
                upstreams = <object>found if found != NULL else forwarder.upstreams_for(peer[1])
                upstream = upstreams[outbox.pick % len(upstreams)]
                if upstream is not last_upstream:  # one per batch, unless the outbox filled up
                    last_upstream = upstream
                    pending, waiting_by, limit, fd = upstream.pending, upstream.waiting, upstream.limit, upstream.fd
                if len(pending) >= limit:
                    counters.fixed[IN_FLIGHT] += 1
                    continue
                entry = _fill(Pending.__new__(Pending), client, addr, data, question, pool, backend)
                # Upstream.send: times first, the owner thread may look at the entry as soon as it is in
                entry.sent = now = _monotonic()
                found = PyDict_GetItem(rtos, backend)
                entry.retry_at = now + (<double>(<object>found) if found != NULL else forwarder.timeout / 2)
                while True:
                    uid = outbox.random_id()
                    entry.uid = uid
                    if PyDict_SetDefault(pending, uid, entry) == <PyObject *>entry:
                        break
                found = PyDict_GetItem(waiting_by, backend)
                waiting = <object>found if found != NULL else waiting_by.setdefault(backend, _deque())
                waiting.append(entry)
                raw = peer[0]
                slot_data = <unsigned char *>receiver.data(i)  # our ID in the slot: entry.query keeps the client's
                slot_data[0] = uid >> 8
                slot_data[1] = uid & 0xFF
                outbox.add_from(fd, slot_data, length, <const unsigned char *>PyBytes_AS_STRING(raw),
                                PyBytes_GET_SIZE(raw))
                slot = counters.slot(backend)
                if slot >= 0:
                    counters.backend_queries[slot] += 1
                else:
                    _count(counts, ("backend_queries", backend))
            except Exception:  # a bug must cost one query, never the worker
                counters.fixed[ERROR] += 1
                self.failed()
        counters.fixed[QUERIES] += taken
        return True


def serve(sock, forwarder, counts, Counters counters, stopping, client, failed, replies=()):
    """``udp.serve`` for one listening socket: forward every datagram until
    the socket is shut down. ``counts`` are the thread's own (for the
    Python path's work), ``counters`` what this loop counts itself, both
    read by the reporter. ``client`` is the socket's ``udp.UdpClient``;
    ``failed()`` logs the exception being handled. With ``replies``
    (``Replies`` of upstream sockets), the same thread serves those sockets
    too, until the listening socket is shut down; it returns the upstreams
    still open."""
    return _loop(_Queries(sock, forwarder, counts, counters, stopping, client, failed), list(replies))


# -- the reply side ------------------------------------------------------------

cdef class Replies:
    """The reply side of one upstream socket (``Upstream.serve``'s batch,
    compiled): its receiver and what its loop reads of the upstream.
    ``counters``, this socket's (``Upstream.counters``)."""

    cdef object upstream, pending, policy, counts
    cdef dict rtts, last_answered, rtos  # the policy's tables: filled in place, never replaced
    cdef double retry_min, half_timeout
    cdef Counters counters
    cdef Receiver receiver
    cdef double[::1] buckets
    cdef dict keys
    cdef double due
    cdef int got
    cdef bint closed

    def __cinit__(self, upstream, Counters counters):
        self.buckets = array.array("d", LATENCY_BUCKETS)
        if counters.nbuckets != self.buckets.shape[0] + 1:
            raise ValueError("the counters were made for other latency buckets")
        self.upstream = upstream
        self.counters = counters
        self.receiver = Receiver(upstream.sock, wait=False)
        self.pending = upstream.pending
        self.policy = upstream.policy
        self.counts = upstream.counts
        self.keys = {}  # backend -> the part of a raw address that names it
        self.rtts, self.last_answered, self.rtos = self.policy.rtts, self.policy.last_answered, self.policy.rtos

    cdef void answered(self, backend, double sent, double rtt) except *:
        """``Forwarder.answered`` (with stats.observe_latency and Rtt.sample),
        with the policy's tables as ``take`` read them for the batch."""
        cdef PyObject *found = PyDict_GetItem(self.rtts, backend)
        if found == NULL:  # the first sample: Forwarder.answered makes the estimate
            self.policy.answered(backend, sent, rtt, self.counts)
            return
        estimate = <object>found
        found = PyDict_GetItem(self.last_answered, backend)
        if found == NULL or sent > <double>(<object>found):
            self.last_answered[backend] = sent
        cdef Py_ssize_t i = 0, n = self.buckets.shape[0]
        while i < n and self.buckets[i] < rtt:  # bisect_left over a dozen bounds
            i += 1
        self.counters.buckets[i] += 1
        self.counters.latency_sum += rtt
        cdef double srtt = estimate.srtt, rttvar = estimate.rttvar
        rttvar = (1 - _BETA) * rttvar + _BETA * abs(srtt - rtt)  # Rtt.sample
        srtt = (1 - _ALPHA) * srtt + _ALPHA * rtt
        estimate.rttvar = rttvar
        estimate.srtt = srtt
        self.rtos[backend] = min(max(srtt + _K * rttvar, self.retry_min), self.half_timeout)  # Rtt.timeout

    cdef int take(self, double now, Outbox outbox) except -1:
        """Read what waits on the socket (a batch at most) and relay the replies."""
        cdef Receiver receiver = self.receiver
        cdef Counters counters = self.counters
        cdef int got, i, uid, slot, fd = -1
        cdef const unsigned char *p
        cdef Py_ssize_t length, size
        cdef PyObject *found
        cdef double sent
        cdef bint retry
        cdef Pending entry
        pending = self.pending
        keys = self.keys
        try:  # self.got is 0 here: the loop resets it after the clocks
            got = receiver.wait()
        except OSError as e:
            if e.errno in mmsg.STALE_ERRORS:
                self.upstream.errors(self.counts, outbox)
            return 0  # EAGAIN: someone read it first, or an error taken by a send
        self.got = got
        policy = self.policy
        self.retry_min, self.half_timeout = policy.retry_min, policy.timeout / 2
        last_client = _UNSET
        for i in range(got):
            p = receiver.data(i)
            length = receiver.length(i)
            if length < 12:
                counters.fixed[SHORT] += 1
                continue
            uid = p[0] << 8 | p[1]
            found = PyDict_GetItem(pending, uid)
            if found == NULL:
                counters.fixed[UNKNOWN] += 1
                continue
            entry = <Pending?>found  # the forwarder makes them all of this class while the fast path runs
            retry = uid == entry.retry_uid
            backend = entry.retry_backend if retry else entry.backend
            found = PyDict_GetItem(keys, backend)
            if found == NULL:
                if len(keys) >= BACKENDS:
                    keys.clear()  # backends come and go over months: bounded
                keys[backend] = key = _peer_key(backend)
            else:
                key = <object>found
            size = PyBytes_GET_SIZE(key)
            if size > receiver.name_size or memcmp(receiver.names + i * NAME, PyBytes_AS_STRING(key), size):
                counters.fixed[WRONG_SOURCE] += 1
                continue
            question = entry.question
            size = PyBytes_GET_SIZE(question)
            if not p[2] & 0x80 or length < 12 + size or \
                    not _same_question(p + 12, <const unsigned char *>PyBytes_AS_STRING(question), size):
                counters.fixed[WRONG_QUESTION] += 1
                continue
            PyDict_DelItem(pending, uid)
            sent = entry.retry_sent if retry else entry.sent
            self.answered(backend, sent, now - sent)
            if entry.done:
                slot = counters.slot(backend)  # the other try won, or the timeout
                if slot >= 0:
                    counters.late_replies[slot] += 1
                else:
                    _count(self.counts, ("late_replies", backend))
                continue
            entry.done = True
            if retry:  # the try that answered becomes the first: entry.backend answered
                entry.backend, entry.retry_backend = entry.retry_backend, entry.backend
                entry.uid, entry.retry_uid = entry.retry_uid, entry.uid
                entry.sent, entry.retry_sent = entry.retry_sent, entry.sent
            if entry.tcp or entry.variants is not None:
                self.policy.reply(entry, receiver.payload(i), self.counts, outbox)
                continue
            # Forwarder._relay for a query forwarded as it came: the client's ID back, in the slot
            counters.responses[p[3] & 0xF] += 1
            query = entry.query
            addr = entry.addr
            memcpy(<unsigned char *>p, PyBytes_AS_STRING(query), 2)
            if entry.client is not last_client:  # a listening socket's, mostly the same one
                last_client = entry.client
                fd = last_client.fd
            outbox.add_from(fd, <unsigned char *>p, length, <const unsigned char *>PyBytes_AS_STRING(addr),
                            PyBytes_GET_SIZE(addr))
        return got

    cdef bint clocks(self, double now, double tick, bint rang, Outbox outbox) except -1:
        """``Upstream.tick``, every tick. ``rang``: the loop's timer says a
        tick has passed (it keeps its own time, a little ahead of ours or
        behind). True when the tick was due (then the loop looks at
        ``closing``)."""
        if now < self.due and not rang:
            return False
        self.due = now + tick
        if self.pending:  # tested here too: an idle worker's tick makes no Python call
            self.upstream.tick(now, self.counts, outbox, self.got >= _batch)
        return True


def due_retries(upstream, double now, counts, outbox):
    """``upstream.due_retries``, which ``Upstream.tick`` calls: every first
    try comes through its backend's queue once, most of them answered by
    then; only a try past its retry time goes to the Python method that
    sends the retry."""
    cdef Pending entry
    for waiting in list(upstream.waiting.values()):
        popleft = waiting.popleft
        while waiting:
            entry = <Pending?>waiting[0]
            if not (entry.done or entry.retry_uid >= 0):
                if entry.retry_at > now:
                    break
                upstream.retry(entry, now, counts, outbox)
            popleft()


def serve_upstreams(replies):
    """``Upstream.serve`` for several upstream sockets (their ``Replies``)
    in one thread: receive replies and run the clocks until every one is
    closed."""
    _loop(None, list(replies))


cdef list _loop(_Queries queries, list replies):
    """One thread's sockets in one epoll set: the listening socket of
    ``queries``, if any, and the upstream sockets of ``replies``, each read
    a batch at a time when ready, the upstreams' clocks every ``tick``. One
    thread for several sockets rather than one each: a worker's threads
    take turns at the GIL, and each thread more that a batch wakes is a
    wake-up and a hand-over more. The upstreams' clocks (retries, timeouts,
    ICMP errors) are their own Python methods, counting in
    ``upstream.counts``; the batches count in the counters. Until the
    listening socket is shut down (then: the upstreams still open, for a
    thread of their own) or, without one, until every upstream is closed."""
    cdef double tick = _tick
    cdef Replies each
    cdef Outbox outbox = Outbox()
    cdef epoll_event events[SOURCES + 2]
    cdef int epfd, timer = -1, ready, j, open_ = len(replies)
    cdef bint serving = queries is not None, due, rang
    cdef double now
    cdef unsigned long long expirations
    cdef itimerspec every
    if len(replies) > SOURCES or (replies and tick <= 0):
        raise ValueError("at most 64 upstream sockets for one loop, and a tick for their clocks")
    epfd = epoll_create1(EPOLL_CLOEXEC)
    if epfd < 0:
        raise OSError(errno, "epoll_create1 failed")
    try:
        for j, each in enumerate(replies):
            _watch(epfd, each.receiver.fd, j)
        if serving:
            _watch(epfd, queries.receiver.fd, CLIENT)
        if replies:
            # The clocks' tick from a periodic timer, not from epoll_wait's
            # timeout: that one is a timer armed and cancelled on every
            # wait, twice a query at low rates, and on a virtual machine
            # each is an exit to the host.
            timer = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK)
            if timer < 0:
                raise OSError(errno, "timerfd_create failed")
            every.it_interval.tv_sec = every.it_value.tv_sec = <long>tick
            every.it_interval.tv_nsec = every.it_value.tv_nsec = <long>((tick - <long>tick) * 1e9)
            if timerfd_settime(timer, 0, &every, NULL) < 0:
                raise OSError(errno, "timerfd_settime failed")
            _watch(epfd, timer, TIMER)
        while serving or (queries is None and open_):
            with nogil:
                ready = epoll_wait(epfd, events, SOURCES + 2, -1)
            now = _monotonic()
            rang = False
            for j in range(max(ready, 0)):  # < 0: EINTR, a signal for the main thread
                if events[j].data.u32 == CLIENT:
                    serving = queries.take(outbox)
                    continue
                if events[j].data.u32 == TIMER:
                    read(timer, &expirations, sizeof(expirations))
                    rang = True
                    continue
                each = replies[events[j].data.u32]
                if each.closed:
                    continue
                if events[j].events & EPOLLERR:  # an ICMP error: its queue drained, or epoll says so again at once
                    each.upstream.errors(each.counts, outbox)
                each.take(now, outbox)
            outbox.flush()  # what woke us goes out before the clocks' work, not after it
            for each in replies:
                if each.closed:
                    continue
                due = each.clocks(now, tick, rang, outbox)
                each.got = 0
                # Upstream.close (within a tick): the socket closed by its reader, here
                if due and each.upstream.closing:
                    epoll_ctl(epfd, EPOLL_CTL_DEL, each.receiver.fd, NULL)
                    each.upstream.sock.close()
                    each.closed = True
                    open_ -= 1
            outbox.flush()
    finally:
        if timer >= 0:
            close(timer)
        close(epfd)
    return [each.upstream for each in replies if not each.closed]


cdef int _watch(int epfd, int fd, unsigned int tag) except -1:
    cdef epoll_event event
    event.events = EPOLLIN | EPOLLERR
    event.data.u32 = tag
    if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event) < 0:
        raise OSError(errno, "epoll_ctl failed")
    return 0
