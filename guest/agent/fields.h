// Growable byte buffers and the tag-length-value fields of control payloads.
#ifndef CELLVM_AGENT_FIELDS_H
#define CELLVM_AGENT_FIELDS_H

#include <stddef.h>
#include <stdint.h>

struct buf {
	uint8_t *data;
	size_t len, cap;
};

void buf_reserve(struct buf *b, size_t extra); // aborts the agent on OOM
void buf_put(struct buf *b, const void *p, size_t n);
void buf_consume(struct buf *b, size_t n); // drop n bytes from the front
void buf_free(struct buf *b);

void put_u16(uint8_t *p, uint16_t v);
void put_u32(uint8_t *p, uint32_t v);
uint16_t get_u16(const uint8_t *p);
uint32_t get_u32(const uint8_t *p);

// Encoding. A nested list (F_ENTRY) is field_begin() ... field_end().
void field_bytes(struct buf *b, uint16_t tag, const void *p, size_t n);
void field_str(struct buf *b, uint16_t tag, const char *s);
void field_int(struct buf *b, uint16_t tag, int64_t v);
size_t field_begin(struct buf *b, uint16_t tag);
void field_end(struct buf *b, size_t start);

// Decoding: iterate with field_next() until it returns 0 (end) or -1 (a
// field's length runs past the payload).
struct field_reader {
	const uint8_t *p;
	size_t left;
};
struct field {
	uint16_t tag;
	const uint8_t *value;
	uint32_t len;
};
int field_next(struct field_reader *r, struct field *f);

// Typed views of one field; each returns -1 if the value is malformed.
int field_as_int(const struct field *f, int64_t *out);
// A malloc'd NUL-terminated copy; -1 if the value contains a NUL byte.
int field_as_cstr(const struct field *f, char **out);

#endif
