/*
 * Greedy longest match of text against the CPM-Bee vocabulary, the original tokenizer's rule, in C.
 *
 * At each position the longest vocabulary piece starting there is taken; a position where none starts adds its
 * character to the current unknown run, and each maximal run gets one id from the `id_for` callable (the ext
 * table's numbering lives in Python, in one place). The pieces form a trie over code points whose edges sit in
 * one open-addressing hash table keyed by (node, code point), so a token costs one probe per character it spans
 * and one list append: 200 characters take a few microseconds, where the Python route (automaton + dict lookups)
 * paid about 100 ns per token.
 *
 * The matcher is immutable once built and never releases the GIL, so one instance serves many threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint32_t node; /* parent node; slot empty when child == 0 (the root is never a child) */
    uint32_t code; /* code point of the edge */
    uint32_t child;
} Edge;

typedef struct {
    PyObject_HEAD
    Edge *edges;        /* hash table of trie edges, capacity mask + 1 (a power of two) */
    uint64_t mask;
    PyObject **values;  /* per node: the piece id (a strong reference), or NULL when no piece ends there */
    uint32_t n_nodes;
} LongestMatcher;

static inline uint64_t
edge_slot(uint32_t node, uint32_t code, uint64_t mask)
{
    uint64_t key = ((uint64_t)node << 21) | code; /* code points fit in 21 bits */
    key *= 0x9E3779B97F4A7C15ull;
    return (key ^ (key >> 29)) & mask;
}

static inline uint32_t
find_child(const LongestMatcher *self, uint32_t node, uint32_t code)
{
    uint64_t slot = edge_slot(node, code, self->mask);
    for (;;) {
        const Edge *edge = &self->edges[slot];
        if (edge->child == 0) {
            return 0;
        }
        if (edge->node == node && edge->code == code) {
            return edge->child;
        }
        slot = (slot + 1) & self->mask;
    }
}

static uint32_t
add_child(LongestMatcher *self, uint32_t node, uint32_t code)
{
    uint64_t slot = edge_slot(node, code, self->mask);
    for (;;) {
        Edge *edge = &self->edges[slot];
        if (edge->child == 0) {
            edge->node = node;
            edge->code = code;
            edge->child = self->n_nodes++;
            return edge->child;
        }
        if (edge->node == node && edge->code == code) {
            return edge->child;
        }
        slot = (slot + 1) & self->mask;
    }
}

static void
LongestMatcher_dealloc(LongestMatcher *self)
{
    if (self->values != NULL) {
        for (uint32_t i = 0; i < self->n_nodes; i++) {
            Py_XDECREF(self->values[i]);
        }
        PyMem_Free(self->values);
    }
    PyMem_Free(self->edges);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
LongestMatcher_init(LongestMatcher *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"pieces", NULL};
    PyObject *pieces, *key, *value;
    Py_ssize_t pos = 0, total = 1;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!:LongestMatcher", kwlist, &PyDict_Type, &pieces)) {
        return -1;
    }
    if (self->edges != NULL) {
        PyErr_SetString(PyExc_TypeError, "LongestMatcher is immutable: build a new one");
        return -1;
    }
    while (PyDict_Next(pieces, &pos, &key, &value)) {
        if (!PyUnicode_Check(key) || PyUnicode_GET_LENGTH(key) == 0 || !PyLong_Check(value)) {
            PyErr_SetString(PyExc_ValueError, "pieces must map non-empty strings to int ids");
            return -1;
        }
        total += PyUnicode_GET_LENGTH(key); /* an upper bound on the nodes (and edges) of the trie */
    }
    if (total >= UINT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "too many pieces");
        return -1;
    }
    uint64_t capacity = 16;
    while (capacity < 2 * (uint64_t)total) {
        capacity <<= 1;
    }
    self->edges = PyMem_Calloc(capacity, sizeof(Edge));
    self->values = PyMem_Calloc(total, sizeof(PyObject *));
    if (self->edges == NULL || self->values == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->mask = capacity - 1;
    self->n_nodes = 1;
    pos = 0;
    while (PyDict_Next(pieces, &pos, &key, &value)) {
        int kind = PyUnicode_KIND(key);
        const void *data = PyUnicode_DATA(key);
        Py_ssize_t n = PyUnicode_GET_LENGTH(key);
        uint32_t node = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            node = add_child(self, node, PyUnicode_READ(kind, data, i));
        }
        Py_INCREF(value);
        Py_XSETREF(self->values[node], value);
    }
    return 0;
}

/* Append the id of text[start:end], an unknown run, from id_for(run). */
static int
append_run(PyObject *ids, PyObject *text, Py_ssize_t start, Py_ssize_t end, PyObject *id_for)
{
    PyObject *run = PyUnicode_Substring(text, start, end);
    if (run == NULL) {
        return -1;
    }
    PyObject *idx = PyObject_CallOneArg(id_for, run);
    Py_DECREF(run);
    if (idx == NULL) {
        return -1;
    }
    int status = PyList_Append(ids, idx);
    Py_DECREF(idx);
    return status;
}

PyDoc_STRVAR(encode_doc,
"encode(text, ids, id_for)\n--\n\n"
"Append to the list `ids` the ids of `text`: the longest piece at each position, and `id_for(run)` for each\n"
"maximal run of characters where no piece starts.");

static PyObject *
LongestMatcher_encode(LongestMatcher *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "encode(text: str, ids: list, id_for: callable)");
        return NULL;
    }
    PyObject *text = args[0], *ids = args[1], *id_for = args[2];
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), pos = 0, run_start = -1;
    PyObject **values = self->values;

    while (pos < n) {
        uint32_t node = 0;
        PyObject *best = NULL;
        Py_ssize_t best_end = pos;
        for (Py_ssize_t i = pos; i < n; i++) {
            node = find_child(self, node, PyUnicode_READ(kind, data, i));
            if (node == 0) {
                break;
            }
            if (values[node] != NULL) {
                best = values[node];
                best_end = i + 1;
            }
        }
        if (best == NULL) {
            if (run_start < 0) {
                run_start = pos;
            }
            pos++;
            continue;
        }
        if (run_start >= 0) {
            if (append_run(ids, text, run_start, pos, id_for) < 0) {
                return NULL;
            }
            run_start = -1;
        }
        if (PyList_Append(ids, best) < 0) {
            return NULL;
        }
        pos = best_end;
    }
    if (run_start >= 0 && append_run(ids, text, run_start, n, id_for) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
LongestMatcher_reduce(LongestMatcher *self, PyObject *Py_UNUSED(ignored))
{
    PyErr_SetString(PyExc_TypeError, "LongestMatcher cannot be pickled: build it again from the vocabulary");
    return NULL;
}

static PyMethodDef LongestMatcher_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))LongestMatcher_encode, METH_FASTCALL, encode_doc},
    {"__reduce__", (PyCFunction)LongestMatcher_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LongestMatcherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "transformers_viscpm.models.cpmbee._longest_match.LongestMatcher",
    .tp_doc = PyDoc_STR("LongestMatcher(pieces: dict[str, int]): greedy longest match over a fixed vocabulary."),
    .tp_basicsize = sizeof(LongestMatcher),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)LongestMatcher_init,
    .tp_dealloc = (destructor)LongestMatcher_dealloc,
    .tp_methods = LongestMatcher_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_longest_match",
    .m_doc = "Greedy longest-match tokenization core for CPM-Bee (the original tokenizer's rule).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__longest_match(void)
{
    if (PyType_Ready(&LongestMatcherType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&LongestMatcherType);
    if (PyModule_AddObject(m, "LongestMatcher", (PyObject *)&LongestMatcherType) < 0) {
        Py_DECREF(&LongestMatcherType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
