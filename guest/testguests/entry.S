/*
 * Entry points of the test guest. The VMM starts every vCPU at _start in
 * 64-bit CPL0 with RDI = vCPU index, RSI = parameter page, RSP = its stack.
 */
#define SYS_EXIT 60

	.section .text.entry, "ax"
	.globl _start
_start:
	call	guest_main
1:	ud2
	jmp	1b

/*
 * User SYSCALL lands here natively in supervisor mode (PVM flags 0x0f: the
 * host already switched CR3 and GS). RSP is still the user stack and is not
 * touched on the null path: `int $0x19` returns to RCX with RFLAGS = R11
 * without a VM exit.
 */
	.text
	.globl syscall_entry
syscall_entry:
	cmp	$SYS_EXIT, %rax
	je	1f
	int	$0x19
1:	mov	$0x44000, %rsp		/* vCPU 0's kernel stack top (x86_boot.h) */
	call	kernel_sys_exit		/* RDI = exit code */
2:	ud2
	jmp	2b

/* Exception stubs: vector number in RDI, then report_exception (no return). */
	.globl exception_stubs
	.balign 16
exception_stubs:
	.set vec, 0
	.rept 32
	.balign 16
	mov	$vec, %edi
	jmp	exception_common
	.set vec, vec + 1
	.endr
exception_common:
	mov	%rsp, %rsi
	call	report_exception
3:	ud2
	jmp	3b
