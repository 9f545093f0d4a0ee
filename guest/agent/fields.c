// Byte buffers and control-payload fields (see fields.h, docs/PROTOCOL.md).
#include "fields.h"

#include <stdlib.h>
#include <string.h>

#include "agent.h"
#include "proto.h"

void buf_reserve(struct buf *b, size_t extra)
{
	if (b->cap - b->len >= extra)
		return;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap - b->len < extra)
		cap *= 2;
	uint8_t *p = realloc(b->data, cap);
	if (!p)
		fatal("out of memory (buffer of %zu bytes)", cap);
	b->data = p;
	b->cap = cap;
}

void buf_put(struct buf *b, const void *p, size_t n)
{
	buf_reserve(b, n);
	if (n)
		memcpy(b->data + b->len, p, n);
	b->len += n;
}

void buf_consume(struct buf *b, size_t n)
{
	if (n >= b->len) {
		b->len = 0;
		return;
	}
	memmove(b->data, b->data + n, b->len - n);
	b->len -= n;
}

void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

void put_u16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

void put_u32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

uint16_t get_u16(const uint8_t *p)
{
	return (uint16_t)(p[0] | (p[1] << 8));
}

uint32_t get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void field_bytes(struct buf *b, uint16_t tag, const void *p, size_t n)
{
	uint8_t hdr[FIELD_HEADER_SIZE];
	put_u16(hdr, tag);
	put_u32(hdr + 2, (uint32_t)n);
	buf_put(b, hdr, sizeof hdr);
	buf_put(b, p, n);
}

void field_str(struct buf *b, uint16_t tag, const char *s)
{
	field_bytes(b, tag, s, strlen(s));
}

void field_int(struct buf *b, uint16_t tag, int64_t v)
{
	uint8_t le[8];
	for (int i = 0; i < 8; i++)
		le[i] = (uint8_t)((uint64_t)v >> (8 * i));
	field_bytes(b, tag, le, sizeof le);
}

size_t field_begin(struct buf *b, uint16_t tag)
{
	size_t start = b->len;
	field_bytes(b, tag, NULL, 0);
	return start;
}

void field_end(struct buf *b, size_t start)
{
	put_u32(b->data + start + 2, (uint32_t)(b->len - start - FIELD_HEADER_SIZE));
}

int field_next(struct field_reader *r, struct field *f)
{
	if (r->left == 0)
		return 0;
	if (r->left < FIELD_HEADER_SIZE)
		return -1;
	uint32_t len = get_u32(r->p + 2);
	if (len > r->left - FIELD_HEADER_SIZE)
		return -1;
	f->tag = get_u16(r->p);
	f->len = len;
	f->value = r->p + FIELD_HEADER_SIZE;
	r->p += FIELD_HEADER_SIZE + len;
	r->left -= FIELD_HEADER_SIZE + len;
	return 1;
}

int field_as_int(const struct field *f, int64_t *out)
{
	if (f->len != 8)
		return -1;
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | f->value[i];
	*out = (int64_t)v;
	return 0;
}

int field_as_cstr(const struct field *f, char **out)
{
	if (memchr(f->value, 0, f->len))
		return -1;
	char *s = malloc((size_t)f->len + 1);
	if (!s)
		fatal("out of memory (string of %u bytes)", f->len);
	memcpy(s, f->value, f->len);
	s[f->len] = 0;
	*out = s;
	return 0;
}
