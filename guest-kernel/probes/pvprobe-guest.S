/* pvprobe-guest.S: guest side of pvprobe.c. Linked at G_CODE, entered in 64-bit mode at CPL0
   (or, with vmmreg=1, already in PV mode) with CR3 = G_KPML4 and RSP in G_KSTACK.
   At entry: r15 = experiment, r14 = 0 (stay emulated), -1 (the VMM registered the VIF page)
   or 0x1000000 | VIF flags (register it with those flags).
   Results are records {pointer to a name, value} at G_RECS that the VMM prints; names with
   "cyc" are TSC cycles (the VMM converts them with the TSC frequency the host reports).
   Conventions: "kernel" code here runs in PV kernel mode (hardware ring 3), user code in the
   page at G_UCODE. Every page the probe uses is user-accessible (U=1) except G_SONLY, and
   G_NOTPRES / G_KONLY, so user code can write records itself. */
#include "pvprobe.h"
.intel_syntax noprefix
.code64

.macro REC name, src
	mov qword ptr [V_TMP], \src
	push rdi
	push rax
	mov rdi, [V_RECPTR]
	cmp rdi, G_RECS_END - 16
	ja 77f
	lea rax, [rip + 78f]
	mov [rdi], rax
	mov rax, [V_TMP]
	mov [rdi + 8], rax
	add qword ptr [V_RECPTR], 16
77:	pop rax
	pop rdi
	.pushsection .rodata.names, "a"
78:	.asciz "\name"
	.popsection
.endm

.macro RDTSC64 dst
	rdtsc
	shl rdx, 32
	or rax, rdx
	mov \dst, rax
.endm

.macro HC n
	mov eax, \n
	int 0x1b
.endm

.text
.globl _start
_start:
	jmp start
/* ---------------------------------------------------------------- IDT stubs (G_STUBS) */
.org G_STUBS - G_CODE
.set vv, 0
.rept 256
	.org G_STUBS - G_CODE + vv * 16
	push rax
	mov al, vv
	jmp vcommon
	.set vv, vv + 1
.endr
/* ------------------------------------------- "switch CR3 first" stubs (G_PSTUBS) */
.org G_PSTUBS - G_CODE
.set vv, 0
.rept 256
	.org G_PSTUBS - G_CODE + vv * 16
	mov cr3, rax
	push rax
	mov al, vv
	jmp vcommon
	.set vv, vv + 1
.endr
/* ------------------------------------------------------------- user code (G_UCODE) */
.org G_UCODE - G_CODE
#include "pvprobe-user.S"
.org G_UCODE - G_CODE + G_UCODE_SZ
start:
	/* Is the very first code native? (10k dec loop in TSC cycles; CS as the guest reads it) */
	RDTSC64 r8
	mov ecx, 10000
1:	dec ecx
	jnz 1b
	RDTSC64 r9
	sub r9, r8
	mov ax, cs
	movzx eax, ax
	REC "entry.cs", rax
	REC "entry.loop10k.cyc", r9
	/* syscall MSRs (Linux's values): STAR, LSTAR, SFMASK = TF|IF|DF|IOPL|AC|NT */
	mov ecx, 0xc0000081
	xor eax, eax
	mov edx, 0x00230010
	wrmsr
	mov ecx, 0xc0000082
	mov rax, offset sys_entry
	mov rdx, rax
	shr rdx, 32
	wrmsr
	mov ecx, 0xc0000084
	mov eax, 0x47700
	xor edx, edx
	wrmsr
	cmp r14, -1
	je 3f
	test r14, r14
	jz 4f
	/* the interface, read in emulated CPL0 mode */
	mov ecx, 0x4b564d11
	call rdmsr_safe
	REC "msr.sig", rax
	mov ecx, 0x4b564d12
	call rdmsr_safe
	REC "msr.features", rax
	mov ecx, 0x4b564d13
	call rdmsr_safe
	REC "msr.tsc_khz", rax
	/* register the VIF page */
	mov ecx, 0x4b564d10
	mov rax, r14
	and eax, 0xffffff
	or eax, G_VIF
	xor edx, edx
	wrmsr
3:	mov ecx, 0x4b564d10
	call rdmsr_safe
	REC "msr.vif.readback", rax
	mov ax, cs
	movzx eax, ax
	REC "pv.cs", rax
	pushfq
	pop rax
	REC "pv.rflags", rax
	RDTSC64 r8
	mov ecx, 10000
1:	dec ecx
	jnz 1b
	RDTSC64 r9
	sub r9, r8
	REC "pv.loop10k.cyc", r9
4:	mov qword ptr [V_UCR3], 0
	mov rax, offset exptab
	jmp qword ptr [rax + r15 * 8]

/* rdmsr ecx -> rax (edx:eax), rax = -1 with V_FAULTVEC = 13 if it faults */
rdmsr_safe:
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	mov qword ptr [V_FAULTVEC], -1
	rdmsr
	shl rdx, 32
	mov eax, eax
	or rax, rdx
	mov qword ptr [V_RESUME], 0
	ret
1:	mov rax, -1
	ret

exptab: .quad exp_info, exp_priv, exp_user, exp_kern, exp_ret, exp_perm, exp_cost, exp_hostile

end_run:
	out P_END, al
	jmp end_run

exp_info:
	mov ecx, 0x4b564d13
	call rdmsr_safe
	REC "pv.msr.tsc_khz", rax
	mov ecx, 0x4b564d11
	call rdmsr_safe
	REC "pv.msr.sig", rax
	jmp end_run

/* ------------------------------------------------------------------ enter user mode */
/* rsi = user RIP. CR3 = V_UCR3 if set. VIF.if = 1. sysretq with rsp = user stack. */
enter_user:
	mov rax, [V_UCR3]
	test rax, rax
	jz 1f
	mov cr3, rax
1:	mov byte ptr [G_VIF], 1
	mov rcx, rsi
	mov r11d, 0x202
	mov rsp, G_USTACK + 0x4000
	sysretq

/* ------------------------------------------------------------------ syscall entry */
/* rax: 0 record and return; 1 return quietly; 2 end the run; 4 dump; 5 continue the
   kernel-side sequence at [V_STATE] (no return); 6 inject IRQ_VEC in rbx ms;
   7 two mov cr3; 8 two SET_CR3 hypercalls; 9 two swapgs; 10 return with 0x100d;
   11 one mov from cr3 */
sys_entry:
	mov [V_SAVE + 0x70], rsp
	movzx esp, byte ptr [G_VIF]
	mov [V_SAVE + 0x78], rsp
	mov rsp, G_KSTACK + 0x3000
	cmp rax, 1
	je sys_ret
	cmp rax, 0
	jne 2f
	mov rax, [V_SAVE + 0x78]
	REC "sys.vif.if_at_entry", rax
	mov rax, [V_SAVE + 0x70]
	REC "sys.rsp_at_entry", rax
	REC "sys.rcx", rcx
	REC "sys.r11", r11
	jmp sys_ret
2:	cmp rax, 2
	jne 3f
	REC "sys.end", 0
	jmp end_run
3:	cmp rax, 4
	jne 4f
	out P_DUMP, al
	jmp sys_ret
4:	cmp rax, 5
	jne 5f
	jmp qword ptr [V_STATE]
5:	cmp rax, 6
	jne 6f
	mov al, IRQ_VEC
	out P_INJMS, al
	jmp sys_ret
6:	cmp rax, 7
	jne 7f
	mov rax, G_KPML4
	mov cr3, rax
	mov rax, G_UPML4
	mov cr3, rax
	jmp sys_ret
7:	cmp rax, 8
	jne 8f
	push rbx
	mov ebx, G_KPML4
	HC 0x1001
	mov ebx, G_UPML4
	HC 0x1001
	pop rbx
	jmp sys_ret
8:	cmp rax, 9
	jne 9f
	swapgs
	swapgs
	jmp sys_ret
9:	cmp rax, 10
	jne 10f
	mov [V_FRAME], rax
	mov [V_FRAME + 8], rbx
	mov [V_FRAME + 16], rcx
	mov [V_FRAME + 24], rcx
	mov qword ptr [V_FRAME + 32], 0x33
	mov [V_FRAME + 40], r11
	mov rax, [V_SAVE + 0x70]
	mov [V_FRAME + 48], rax
	mov qword ptr [V_FRAME + 56], 0x2b
	mov ebx, V_FRAME
	mov byte ptr [G_VIF], 1
	HC 0x100d
	REC "sys.100d.returned!", rax
	jmp end_run
10:	cmp rax, 11
	jne 11f
	mov rax, cr3
	jmp sys_ret
11:	cmp rax, 12
	jne 12f
	push rcx
	push rdx
	xor ecx, ecx
	rdpkru
	REC "sys.pkru_in_kernel", rax
	pop rdx
	pop rcx
	jmp sys_ret
12:	cmp rax, 13
	jne 13f
	swapgs                          /* as Linux: kernel GS while in the kernel */
	out 0x80, al                    /* an exit to the VMM */
	swapgs
	jmp sys_ret
13:	cmp rax, 14
	jne 14f
	swapgs
	push rax
	push rbx
	mov al, IRQ_VEC
	mov ebx, 5
	out P_INJMS, al
	mov byte ptr [G_VIF], 1
	HC 0x1009                       /* block until the interrupt: the vCPU is descheduled */
	pop rbx
	pop rax
	swapgs
	jmp sys_ret
14:	cmp rax, 15
	jne 15f
	push rax
	mov al, IRQ_VEC
	mov ebx, 5
	out P_INJMS, al
	mov byte ptr [G_VIF], 1
	HC 0x1009                       /* the same without swapgs around it */
	pop rax
	jmp sys_ret
15:	cmp rax, 16
	jne 16f
	push rcx
	push rdx
	rdgsbase rax
	REC "  sys.rdgsbase", rax
	mov ecx, 0xc0000101
	rdmsr
	shl rdx, 32
	or rax, rdx
	REC "  sys.msr_gs_base", rax
	mov ecx, 0xc0000102
	rdmsr
	shl rdx, 32
	or rax, rdx
	REC "  sys.msr_kernel_gs_base", rax
	pop rdx
	pop rcx
	jmp sys_ret
16:	cmp rax, 17
	jne 17f
	swapgs
	swapgs
	mov eax, 10                     /* then return through 0x100d like action 10 */
	jmp 9b
17:	cmp rax, 18
	jne 18f
	swapgs
	swapgs
	jmp sys_ret
18:	cmp rax, 19
	jne 19f
	swapgs                          /* Linux's entry swapgs, and no swapgs on the way out: */
	mov eax, 10                     /* the return's own exchange restores the user's GS base */
	jmp 9b
19:	REC "sys.unknown", rax
sys_ret:
	mov byte ptr [G_VIF], 1
	mov rsp, [V_SAVE + 0x70]
	sysretq

/* ------------------------------------------------------------------ events */
/* Stub v (at G_STUBS + 16 v): push rax; mov al, v; jmp vcommon. The "switch CR3 first"
   stubs (G_PSTUBS, experiment perm) start with mov cr3, rax: user code preloads rax with
   G_KPML4, so nothing touches the stack before the kernel table is live.
   In vcommon the stack holds r8 rbp rdi rsi rdx rcx rbx rax, then the error code (vectors
   8, 10-14, 17), then rip cs rflags rsp ss. V_RESUME (if set) becomes the return RIP. */
vcommon:
	push rbx
	movzx ebx, byte ptr [G_VIF]      /* VIF.if as the handler found it */
	push rcx
	push rdx
	push rsi
	push rdi
	push rbp
	push r8
	mov r8, rbx
	movzx eax, al
	mov [V_FAULTVEC], rax
	lea rbp, [rsp + 64]
	xor edx, edx
	cmp eax, 8
	je 1f
	cmp eax, 10
	jb 2f
	cmp eax, 14
	jbe 1f
	cmp eax, 17
	jne 2f
1:	mov rdx, [rbp]
	add rbp, 8
2:	/* rbp -> rip cs rflags rsp ss; rdx = error code */
	cmp eax, IRQ_VEC
	jne 3f
	mov rcx, [rbp]
	mov [V_IRQSEEN], rcx
	mov rcx, [rbp + 8]
	mov [V_IRQCS], rcx
	mov [V_IRQIF], r8
	inc qword ptr [V_IRQN]
	cmp qword ptr [V_IRQCHIP], 0
	je 7f
	push rax
	push rdx
	mov ecx, 0x80b                  /* x2APIC EOI */
	xor eax, eax
	xor edx, edx
	wrmsr
	pop rdx
	pop rax
7:
	cmp qword ptr [V_QUIETEV], 0
	jne 5f
	mov rcx, [V_IRQSEEN]
	REC "irq.frame.rip", rcx
	mov rcx, [V_IRQCS]
	REC "irq.frame.cs", rcx
	mov rcx, [rbp + 16]
	REC "irq.frame.rflags", rcx
	mov rcx, [rbp + 24]
	REC "irq.frame.rsp", rcx
	REC "irq.vif.if_at_entry", r8
	REC "irq.handler.frame_at", rbp
	jmp 5f
3:	cmp qword ptr [V_QUIETEV], 0
	jne 4f
	REC "ev.vector", rax
	REC "ev.err", rdx
	mov rcx, [rbp]
	REC "ev.frame.rip", rcx
	mov rcx, [rbp + 8]
	REC "ev.frame.cs", rcx
	mov rcx, [rbp + 16]
	REC "ev.frame.rflags", rcx
	mov rcx, [rbp + 24]
	REC "ev.frame.rsp", rcx
	mov rcx, [rbp + 32]
	REC "ev.frame.ss", rcx
	REC "ev.vif.if_at_entry", r8
	REC "ev.frame_at", rbp
	mov rcx, cr3
	REC "ev.cr3", rcx
	cmp eax, 14
	jne 4f
	mov rcx, cr2
	REC "ev.cr2", rcx
	mov rcx, [G_VIF + 8]
	REC "ev.vif+8", rcx
4:	mov rcx, [V_RESUME]
	test rcx, rcx
	jz 6f
	mov [rbp], rcx
	mov qword ptr [V_RESUME], 0
	jmp 5f
6:	cmp eax, 3
	je 5f
	cmp eax, 4
	je 5f
	REC "ev.unexpected(no resume)", rax
	jmp end_run
5:	mov rcx, [rbp]                  /* from user mode: the frame RIP is in the user code page */
	sub rcx, G_UCODE
	cmp rcx, G_UCODE_SZ
	jb ret_user
ret_iretq:
	mov [V_TMP2], rbp
	pop r8
	pop rbp
	pop rdi
	pop rsi
	pop rdx
	pop rcx
	pop rbx
	pop rax
	mov rsp, [V_TMP2]
	iretq
ret_user:
	mov rax, [V_UCR3]
	test rax, rax
	jz 1f
	mov cr3, rax
1:	mov rax, [rbp]
	mov [V_FRAME + 24], rax
	mov rax, [rbp + 8]
	mov [V_FRAME + 32], rax
	mov rax, [rbp + 16]
	mov [V_FRAME + 40], rax
	mov rax, [rbp + 24]
	mov [V_FRAME + 48], rax
	mov rax, [rbp + 32]
	mov [V_FRAME + 56], rax
	mov rax, [V_URET]
	cmp rax, RET_IRETQ
	je ret_iretq
	cmp rax, RET_SYSRET
	je ret_sysret
	/* hypercall 0x100d, rbx -> [rax, rbx, rcx, rip, cs, rflags, rsp, ss] */
	pop r8
	pop rbp
	pop rdi
	pop rsi
	pop rdx
	pop rcx
	pop rbx
	pop rax
	mov [V_FRAME], rax
	mov [V_FRAME + 8], rbx
	mov [V_FRAME + 16], rcx
	mov byte ptr [G_VIF], 1
	mov ebx, V_FRAME
	HC 0x100d
	REC "ret.100d.returned!", rax
	jmp end_run
ret_sysret:
	pop r8
	pop rbp
	pop rdi
	pop rsi
	pop rdx
	pop rcx
	pop rbx
	pop rax
	mov byte ptr [G_VIF], 1
	mov rcx, [V_FRAME + 24]
	mov r11, [V_FRAME + 40]
	mov rsp, [V_FRAME + 48]
	sysretq

/* ------------------------------------------------------------------ experiment priv */
/* Each instruction once (fault or not: V_FAULTVEC, -1 = none; its rax afterwards), then,
   if it did not fault, 1000 times timed. Variant N skips the first N instructions. */
.set privn, 0
/* PRIV(name, instructions...): a C macro (GAS would split its arguments at ';') around
   three GAS macros, so that the instructions appear twice: once alone, once timed. */
#define PRIV(name, ...) PRIV_A name ; __VA_ARGS__ ; PRIV_B ; __VA_ARGS__ ; PRIV_C
.macro PRIV_A name
	cmp qword ptr [V_VARIANT], privn
	ja 9f
	cmp qword ptr [V_ONLY], 0
	je 6f
	cmp qword ptr [V_VARIANT], privn
	jne 9f
6:
	REC "priv.\name", privn
	lea rax, [rip + 8f]
	mov [V_RESUME], rax
	mov qword ptr [V_FAULTVEC], -1
.endm
.macro PRIV_B
8:	mov [V_TMP2], rax
	mov qword ptr [V_RESUME], 0
	mov rax, [V_FAULTVEC]
	REC "  vector", rax
	mov rax, [V_TMP2]
	REC "  rax", rax
	cmp qword ptr [V_FAULTVEC], -1
	jne 9f
	RDTSC64 r9
	mov r8d, 1000
7:
.endm
.macro PRIV_C
	dec r8d
	jnz 7b
	RDTSC64 rax
	sub rax, r9
	xor edx, edx
	mov ecx, 1000
	div rcx
	REC "  each.cyc", rax
9:	.set privn, privn + 1
.endm

exp_priv:
	mov qword ptr [V_QUIETEV], 1
	mov byte ptr [G_VIF], 0
	PRIV(nothing, nop)
	PRIV(rdtsc, rdtsc)
	PRIV(out_exit, out 0x80, al)
	PRIV(swapgs_x2, swapgs; swapgs)
	PRIV(cr3_read, mov rax, cr3)
	PRIV(cr3_write_same, mov rax, cr3; mov cr3, rax)
	PRIV(hc_set_cr3, mov ebx, G_KPML4; mov eax, 0x1001; int 0x1b)
	PRIV(hc_flush_tlb, mov eax, 0x1007; int 0x1b)
	PRIV(hc_flush_tlb_one, mov ebx, G_VARS; mov eax, 0x1008; int 0x1b)
	PRIV(invlpg, invlpg [G_VARS])
	PRIV(cr2_read, mov rax, cr2)
	PRIV(cr0_read, mov rax, cr0)
	PRIV(cr0_write_same, mov rax, cr0; mov cr0, rax)
	PRIV(cr4_read, mov rax, cr4)
	PRIV(cr4_write_same, mov rax, cr4; mov cr4, rax)
	PRIV(cr8_read, mov rax, cr8)
	PRIV(smsw, smsw rax)
	PRIV(clts, clts)
	PRIV(dr7_read, mov rax, dr7)
	PRIV(dr7_write_same, mov rax, dr7; mov dr7, rax)
	PRIV(lgdt_same, lgdt [gdtr_desc])
	PRIV(lidt_same, lidt [idtr_desc])
	PRIV(hc_load_gdt, mov ebx, G_GDT; mov ecx, 0x4f; mov eax, 0x1004; int 0x1b)
	PRIV(hc_load_idt, mov ebx, G_IDT; mov ecx, 0xfff; mov eax, 0x1005; int 0x1b)
	PRIV(sgdt_base, sgdt [V_SAVE]; mov rax, [V_SAVE + 2])
	PRIV(sidt_base, sidt [V_SAVE]; mov rax, [V_SAVE + 2])
	PRIV(str, xor eax, eax; str ax)
	PRIV(sldt, xor eax, eax; sldt ax)
	PRIV(rdmsr_lstar, mov ecx, 0xc0000082; rdmsr; shl rdx, 32; or rax, rdx)
	PRIV(wrmsr_lstar_same, mov ecx, 0xc0000082; rdmsr; wrmsr)
	PRIV(hc_wrmsr_lstar_same, mov ecx, 0xc0000082; rdmsr; shl rdx, 32; or rax, rdx; mov rcx, rax; mov ebx, 0xc0000082; mov eax, 0x1003; int 0x1b)
	PRIV(rdmsr_efer, mov ecx, 0xc0000080; rdmsr)
	PRIV(rdmsr_gs_base, mov ecx, 0xc0000101; rdmsr; shl rdx, 32; or rax, rdx)
	PRIV(wrmsr_kernel_gs_base, mov ecx, 0xc0000102; xor eax, eax; xor edx, edx; wrmsr)
	PRIV(wrmsr_fs_base, mov ecx, 0xc0000100; xor eax, eax; xor edx, edx; wrmsr)
	PRIV(rdmsr_vif, mov ecx, 0x4b564d10; rdmsr)
	PRIV(rdmsr_tsc_aux, mov ecx, 0xc0000103; rdmsr)
	PRIV(rdmsr_apicbase, mov ecx, 0x1b; rdmsr)
	PRIV(wrmsr_x2apic_eoi, mov ecx, 0x80b; xor eax, eax; xor edx, edx; wrmsr)
	PRIV(rdfsbase, rdfsbase rax)
	PRIV(wrfsbase, xor eax, eax; wrfsbase rax)
	PRIV(rdgsbase, rdgsbase rax)
	PRIV(wrgsbase, xor eax, eax; wrgsbase rax)
	PRIV(cli_then_vif, cli; movzx eax, byte ptr [G_VIF])
	PRIV(sti_then_vif, sti; movzx eax, byte ptr [G_VIF]; mov byte ptr [G_VIF], 0)
	PRIV(pushf, pushfq; pop rax)
	PRIV(popf_if1_then_vif, pushfq; or qword ptr [rsp], 0x200; popfq; movzx eax, byte ptr [G_VIF]; mov byte ptr [G_VIF], 0)
	PRIV(popf_iopl3, pushfq; or qword ptr [rsp], 0x3000; popfq; pushfq; pop rax)
	PRIV(mov_ss_kernel, mov eax, 0x18; mov ss, ax)
	PRIV(mov_ss_user, mov eax, 0x2b; mov ss, ax)
	PRIV(read_ss, xor eax, eax; mov ax, ss)
	PRIV(mov_ds_kernel, mov eax, 0x18; mov ds, ax)
	PRIV(mov_ds_user, mov eax, 0x2b; mov ds, ax)
	PRIV(mov_ds_null, xor eax, eax; mov ds, ax)
	PRIV(mov_es_null, xor eax, eax; mov es, ax)
	PRIV(read_ds, xor eax, eax; mov ax, ds)
	PRIV(rdtscp, rdtscp)
	PRIV(rdpid, rdpid rax)
	PRIV(xgetbv0, xor ecx, ecx; xgetbv)
	PRIV(cpuid_1a_d_0_ebx_size, mov eax, 0xd; xor ecx, ecx; int 0x1a; mov eax, ebx)
	PRIV(cr4_set_osxsave, mov rax, cr4; bts rax, 18; mov cr4, rax; mov rax, cr4)
	PRIV(xgetbv0_after_osxsave, xor ecx, ecx; xgetbv)
	PRIV(cpuid_1a_d_0_ebx_after_osxsave, mov eax, 0xd; xor ecx, ecx; int 0x1a; mov eax, ebx)
	PRIV(xsetbv_7, xor ecx, ecx; xor edx, edx; mov eax, 7; xsetbv; xor ecx, ecx; xgetbv)
	PRIV(vpxor_ymm_after_xcr0_7, vpxor ymm1, ymm1, ymm1)
	PRIV(vpxord_zmm_after_xcr0_7, vpxord zmm1, zmm1, zmm1)
	PRIV(cpuid_1a_d_0_ebx_after_xsetbv7, mov eax, 0xd; xor ecx, ecx; int 0x1a; mov eax, ebx)
	PRIV(xsetbv_2e7, xor ecx, ecx; xor edx, edx; mov eax, 0x2e7; xsetbv; xor ecx, ecx; xgetbv)
	PRIV(vpxord_zmm_after_xcr0_2e7, vpxord zmm1, zmm1, zmm1)
	PRIV(cpuid_1a_d_0_ebx_after_xsetbv2e7, mov eax, 0xd; xor ecx, ecx; int 0x1a; mov eax, ebx)
	PRIV(xsetbv_602e7_amx, xor ecx, ecx; xor edx, edx; mov eax, 0x602e7; xsetbv; xor ecx, ecx; xgetbv)
	PRIV(xsetbv_same, xor ecx, ecx; xgetbv; xsetbv)
	PRIV(xgetbv1_inuse, mov ecx, 1; xgetbv)
	PRIV(xsave, mov eax, -1; mov edx, -1; xsave [G_XSAVE])
	PRIV(xsaveopt, mov eax, -1; mov edx, -1; xsaveopt [G_XSAVE])
	PRIV(xsavec, mov eax, -1; mov edx, -1; xsavec [G_XSAVE + 0x1000])
	PRIV(xrstor, mov eax, -1; mov edx, -1; xrstor [G_XSAVE])
	PRIV(vpxor_ymm, vpxor ymm0, ymm0, ymm0)
	PRIV(vpxord_zmm16, vpxord zmm16, zmm16, zmm16)
	PRIV(kmovq, kmovq k1, k2)
	PRIV(rdpmc0, xor ecx, ecx; rdpmc)
	PRIV(rdpkru, xor ecx, ecx; rdpkru)
	PRIV(hlt, hlt)
	PRIV(hc_halt, mov eax, 0x1009; int 0x1b)
	PRIV(cpuid_raw_40000000, mov eax, 0x40000000; xor ecx, ecx; cpuid; mov eax, ebx)
	PRIV(cpuid_1a_40000000, mov eax, 0x40000000; xor ecx, ecx; int 0x1a; mov eax, ebx)
	PRIV(cpuid_raw_1_ecx, mov eax, 1; xor ecx, ecx; cpuid; mov eax, ecx)
	PRIV(cpuid_1a_1_ecx, mov eax, 1; xor ecx, ecx; int 0x1a; mov eax, ecx)
	PRIV(cpuid_1a_7_ebx, mov eax, 7; xor ecx, ecx; int 0x1a; mov eax, ebx)
	PRIV(cpuid_raw_7_ebx, mov eax, 7; xor ecx, ecx; cpuid; mov eax, ebx)
	PRIV(cpuid_1a_d_1_eax, mov eax, 0xd; mov ecx, 1; int 0x1a)
	PRIV(verw, mov eax, 0x18; verw ax)
	PRIV(wbinvd, wbinvd)
	PRIV(iretq_kernel_cs10, mov rax, rsp; push 0x18; push rax; pushfq; push 0x10; lea rax, [rip + 1f]; push rax; iretq; 1:)
	PRIV(int3_kernel, int3)
	PRIV(load_gs_null, xor eax, eax; mov gs, ax)
	PRIV(in_port, in al, 0x80)
	PRIV(lretq_kernel_cs10, push 0x10; lea rax, [rip + 1f]; push rax; lretq; 1: mov ax, cs)
	PRIV(mov_ss_null, xor eax, eax; mov ss, ax; mov ax, ss)
	PRIV(mov_ss_kernel_again, mov eax, 0x18; mov ss, ax; mov ax, ss)
	PRIV(lldt_null, xor eax, eax; lldt ax)
	PRIV(rdmsr_misc_enable, mov ecx, 0x1a0; rdmsr)
	PRIV(rdmsr_pat, mov ecx, 0x277; rdmsr; shl rdx, 32; or rax, rdx)
	PRIV(wrmsr_pat_same, mov ecx, 0x277; rdmsr; wrmsr)
	PRIV(rdmsr_xfd, mov ecx, 0x1c4; rdmsr)
	PRIV(rdmsr_xss, mov ecx, 0xda0; rdmsr)
	PRIV(rdmsr_spec_ctrl, mov ecx, 0x48; rdmsr)
	PRIV(wrmsr_tsc_deadline, mov ecx, 0x6e0; xor eax, eax; xor edx, edx; wrmsr)
	PRIV(rdmsr_kvm_system_time_new, mov ecx, 0x4b564d01; rdmsr)
	PRIV(lretq_user_cs33, push 0x33; lea rax, [rip + 1f]; push rax; lretq; 1: mov ax, cs)
	PRIV(iretq_kernel_cs33, mov rax, rsp; push 0x2b; push rax; pushfq; push 0x33; lea rax, [rip + 1f]; push rax; iretq; 1: movzx eax, byte ptr [G_VIF])
	PRIV(ltr_same_busy, mov ax, 0x40; ltr ax)   /* once works (the TSS becomes busy); the timed repeats #GP like hardware */
	PRIV(invpcid_all, mov eax, 2; invpcid rax, [V_SAVE])   /* fatal: emulation failure */
	PRIV(xsaves, mov eax, -1; mov edx, -1; xsaves [G_XSAVE + 0x1000])   /* fatal: KVM_EXIT_INTERNAL_ERROR (emulation failure) */
	PRIV(stac, stac)   /* fatal: emulation failure */
	PRIV(clac, clac)   /* fatal: emulation failure */
	REC "priv.done", privn
	jmp end_run

.data
.balign 16
	.word 0, 0, 0
gdtr_desc: .word 0x4f
	.quad G_GDT
	.word 0, 0, 0
idtr_desc: .word 0xfff
	.quad G_IDT
.text

/* ------------------------------------------------------------------ experiment user */
exp_user:
	mov qword ptr [V_UCR3], G_UPML4
	mov rsi, offset u_tests
	jmp enter_user

/* ------------------------------------------------------------------ experiment kern */
.macro SPIN n
	mov rcx, \n
99:	dec rcx
	jnz 99b
.endm
/* which registers a hypercall (or int 0x1a) changes: markers in all, then compare */
#define HCREGS(name, ...) HCREGS_A name ; __VA_ARGS__ ; HCREGS_B
.macro HCREGS_A name
	REC "k.regs_after.\name", 0
	mov rbx, 0x1111111111
	mov rcx, 0x2222222222
	mov rdx, 0x3333333333
	mov rsi, 0x4444444444
	mov rdi, 0x5555555555
	mov rbp, 0x6666666666
	mov r8, 0x8888888888
	mov r9, 0x9999999999
	mov r10, 0x1010101010
	mov r11, 0x1111111112
	mov r12, 0x1212121212
	mov r13, 0x1313131313
.endm
.macro HCREGS_B
	mov [V_SAVE], rax
	mov [V_SAVE + 8], rbx
	mov [V_SAVE + 16], rcx
	mov [V_SAVE + 24], rdx
	mov [V_SAVE + 32], rsi
	mov [V_SAVE + 40], rdi
	mov [V_SAVE + 48], rbp
	mov [V_SAVE + 56], r8
	mov [V_SAVE + 64], r9
	mov [V_SAVE + 72], r10
	mov [V_SAVE + 80], r11
	mov [V_SAVE + 88], r12
	mov [V_SAVE + 96], r13
	call check_markers
.endm
check_markers:
	mov rax, [V_SAVE]
	REC "  rax", rax
	mov rax, 0x1111111111
	cmp [V_SAVE + 8], rax
	je 1f
	mov rax, [V_SAVE + 8]
	REC "  rbx CHANGED", rax
1:	mov rax, 0x2222222222
	cmp [V_SAVE + 16], rax
	je 1f
	mov rax, [V_SAVE + 16]
	REC "  rcx CHANGED", rax
1:	mov rax, 0x3333333333
	cmp [V_SAVE + 24], rax
	je 1f
	mov rax, [V_SAVE + 24]
	REC "  rdx CHANGED", rax
1:	mov rax, 0x4444444444
	cmp [V_SAVE + 32], rax
	je 1f
	REC "  rsi CHANGED", 1
1:	mov rax, 0x5555555555
	cmp [V_SAVE + 40], rax
	je 1f
	REC "  rdi CHANGED", 1
1:	mov rax, 0x6666666666
	cmp [V_SAVE + 48], rax
	je 1f
	REC "  rbp CHANGED", 1
1:	mov rax, 0x8888888888
	cmp [V_SAVE + 56], rax
	je 1f
	REC "  r8 CHANGED", 1
1:	mov rax, 0x9999999999
	cmp [V_SAVE + 64], rax
	je 1f
	REC "  r9 CHANGED", 1
1:	mov rax, 0x1010101010
	cmp [V_SAVE + 72], rax
	je 1f
	REC "  r10 CHANGED", 1
1:	mov rax, 0x1111111112
	cmp [V_SAVE + 80], rax
	je 1f
	mov rax, [V_SAVE + 80]
	REC "  r11 CHANGED", rax
1:	mov rax, 0x1212121212
	cmp [V_SAVE + 88], rax
	je 1f
	REC "  r12 CHANGED", 1
1:	mov rax, 0x1313131313
	cmp [V_SAVE + 96], rax
	je 1f
	REC "  r13 CHANGED", 1
1:	ret
exp_kern:
	/* swapgs: does it exchange the hardware GS base (rdgsbase/wrgsbase) with KERNEL_GS_BASE? */
	REC "k.swapgs", 0
	mov rax, 0xaaaa000
	wrgsbase rax
	mov ecx, 0xc0000102
	mov eax, 0xbbbb000
	xor edx, edx
	wrmsr
	rdgsbase rax
	REC "  gsbase.before(A=aaaa000)", rax
	mov ecx, 0xc0000101
	rdmsr
	REC "  msr.gs_base.before", rax
	swapgs
	rdgsbase rax
	REC "  gsbase.after_swapgs(want bbbb000)", rax
	mov ecx, 0xc0000101
	rdmsr
	REC "  msr.gs_base.after_swapgs", rax
	mov ecx, 0xc0000102
	rdmsr
	REC "  msr.kernel_gs_base.after_swapgs(want aaaa000)", rax
	mov rax, 0xcccc000
	wrgsbase rax
	swapgs
	rdgsbase rax
	REC "  gsbase.after_wrgsbase_c_swapgs(want aaaa000)", rax
	mov ecx, 0xc0000102
	rdmsr
	REC "  msr.kernel_gs_base(want cccc000)", rax
	mov ecx, 0xc0000101
	rdmsr
	REC "  msr.gs_base(want aaaa000)", rax
	HCREGS(hc_unknown_10ff, mov eax, 0x10ff; int 0x1b)
	HCREGS(hc_flush_tlb, mov eax, 0x1007; int 0x1b)
	HCREGS(hc_set_cr3, mov eax, 0x1001; mov ebx, G_KPML4; int 0x1b)
	HCREGS(cpuid_1a_leaf1, mov eax, 1; int 0x1a)
	HCREGS(out80, out 0x80, al)
	mov byte ptr [G_VIF], 0
	REC "k.int3.vif_if0", 0
	int3
	movzx eax, byte ptr [G_VIF]
	REC "  vif.if_after_iretq", rax
	mov byte ptr [G_VIF], 1
	REC "k.int3.vif_if1", 1
	int3
	movzx eax, byte ptr [G_VIF]
	REC "  vif.if_after_iretq", rax
	REC "k.ud2.vif_if1", 1
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	ud2
1:	mov byte ptr [G_VIF], 0
	REC "k.pf_notpresent.vif_if0", 0
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	mov rax, [G_NOTPRES + 0x18]
1:	REC "k.iretq_frame_if0.vif_if1", 0
	mov byte ptr [G_VIF], 1
	mov rax, rsp
	push 0x18
	push rax
	push 0x2
	push 0x10
	lea rax, [rip + 1f]
	push rax
	iretq
1:	movzx eax, byte ptr [G_VIF]
	REC "  vif.if_after_iretq", rax
	REC "k.iretq_frame_if1.vif_if0", 0
	mov byte ptr [G_VIF], 0
	mov rax, rsp
	push 0x18
	push rax
	push 0x202
	push 0x10
	lea rax, [rip + 1f]
	push rax
	iretq
1:	movzx eax, byte ptr [G_VIF]
	REC "  vif.if_after_iretq", rax
	/* an interrupt queued while VIF.if = 1: where and how is it delivered? */
	REC "k.irq.vif_if1", 0
	mov qword ptr [V_IRQN], 0
	mov byte ptr [G_VIF], 1
	mov al, IRQ_VEC
	out P_INJECT, al
	nop
	nop
	mov rax, [V_IRQN]
	REC "  irq.count", rax
	movzx eax, byte ptr [G_VIF]
	REC "  vif.if_after", rax
	/* queued while VIF.if = 0: held? delivered when if = 1 without an exit? after an exit? */
	REC "k.irq.vif_if0", 0
	mov qword ptr [V_IRQN], 0
	mov byte ptr [G_VIF], 0
	mov al, IRQ_VEC
	out P_INJECT, al
	SPIN 100000
	mov rax, [V_IRQN]
	REC "  irq.count.while_if0", rax
	movzx eax, byte ptr [G_VIF + 1]
	REC "  vif.pending", rax
	mov byte ptr [G_VIF], 1
	SPIN 100000
	mov rax, [V_IRQN]
	REC "  irq.count.after_if1_no_exit", rax
	out 0x80, al
	mov rax, [V_IRQN]
	REC "  irq.count.after_out80", rax
	movzx eax, byte ptr [G_VIF + 1]
	REC "  vif.pending", rax
	/* an interrupt that arrives while the guest runs natively with VIF.if = 1 */
	REC "k.irq.async.vif_if1", 0
	mov qword ptr [V_IRQN], 0
	mov qword ptr [V_IRQSEEN], 0
	mov byte ptr [G_VIF], 1
	mov al, IRQ_VEC
	mov ebx, 20
	out P_INJMS, al
	lea rax, [rip + 1f]
	REC "  spin.loop.at", rax
	mov rcx, 1500000000
1:	dec rcx
	jz 2f
	cmp qword ptr [V_IRQN], 0
	je 1b
2:	REC "  spin.left", rcx
	mov rax, [V_IRQN]
	REC "  irq.count", rax
	/* the same with VIF.if = 0: held while spinning? */
	REC "k.irq.async.vif_if0", 0
	mov qword ptr [V_IRQN], 0
	mov byte ptr [G_VIF], 0
	mov al, IRQ_VEC
	mov ebx, 20
	out P_INJMS, al
	mov rcx, 800000000
1:	dec rcx
	jnz 1b
	mov rax, [V_IRQN]
	REC "  irq.count.after_spin", rax
	movzx eax, byte ptr [G_VIF + 1]
	REC "  vif.pending", rax
	mov byte ptr [G_VIF], 1
	mov rcx, 100000000
1:	dec rcx
	jnz 1b
	mov rax, [V_IRQN]
	REC "  irq.count.after_if1_spin", rax
	cmp byte ptr [G_VIF + 1], 0
	je 1f
	out 0x80, al
1:	mov rax, [V_IRQN]
	REC "  irq.count.after_poke", rax
	/* halting: hlt and hypercall 0x1009 with an interrupt due in 30 ms */
	REC "k.hlt.vif_if1", 0
	mov qword ptr [V_IRQN], 0
	mov al, IRQ_VEC
	mov ebx, 30
	out P_INJMS, al
	RDTSC64 r9
	hlt
	RDTSC64 rax
	sub rax, r9
	REC "  hlt.cyc", rax
	mov rax, [V_IRQN]
	REC "  irq.count", rax
	mov rcx, 200000000
1:	dec rcx
	jz 2f
	cmp qword ptr [V_IRQN], 0
	je 1b
2:	REC "k.hc_halt.vif_if1", 0
	mov qword ptr [V_IRQN], 0
	mov al, IRQ_VEC
	mov ebx, 30
	out P_INJMS, al
	RDTSC64 r9
	HC 0x1009
	mov [V_TMP2], rax
	RDTSC64 rax
	sub rax, r9
	REC "  hc_halt.cyc", rax
	mov rax, [V_TMP2]
	REC "  hc_halt.rax", rax
	mov rax, [V_IRQN]
	REC "  irq.count", rax
	/* does a kernel-mode event and its iretq exchange GS bases too? */
	REC "k.gsbase_across_kernel_int3_iretq", 0
	mov rax, 0x5a5a000
	wrgsbase rax
	int3
	rdgsbase rax
	REC "  gsbase.after(want 5a5a000)", rax
	/* halting, in a loop until an interrupt due in 30 ms has arrived: how many halts? */
.macro HALTLOOP name, vifif, insn:vararg
	REC "k.haltloop.\name", \vifif
	mov qword ptr [V_IRQN], 0
	mov byte ptr [G_VIF], \vifif
	mov al, IRQ_VEC
	mov ebx, 30
	out P_INJMS, al
	RDTSC64 r9
	xor r10d, r10d
1:	\insn
	inc r10
	cmp r10, 100000
	je 2f
	cmp qword ptr [V_IRQN], 0
	je 1b
2:	RDTSC64 rax
	sub rax, r9
	REC "  total.cyc", rax
	REC "  halts", r10
	mov rax, [V_IRQN]
	REC "  irq.count", rax
	movzx eax, byte ptr [G_VIF]
	REC "  vif.if.after", rax
	mov byte ptr [G_VIF], 1
	out 0x80, al
.endm
	HALTLOOP hc_if1, 1, HC 0x1009
	HALTLOOP hlt_if1, 1, hlt
	/* safe halt: an interrupt pending (held while VIF.if = 0), then VIF.if = 1 and the halt
	   hypercall at once: is it delivered, and does the halt then return at once? */
	REC "k.pending_then_if1_hc_halt", 0
	mov qword ptr [V_IRQN], 0
	mov byte ptr [G_VIF], 0
	mov al, IRQ_VEC
	out P_INJECT, al
	movzx eax, byte ptr [G_VIF + 1]
	REC "  vif.pending", rax
	RDTSC64 r9
	mov byte ptr [G_VIF], 1
	HC 0x1009
	lea rax, [rip]
	REC "  after_hc.rip", rax
	RDTSC64 rax
	sub rax, r9
	REC "  hc_halt.cyc", rax
	mov rax, [V_IRQN]
	REC "  irq.count", rax
	/* variant 3: halt with VIF.if = 0 (never wakes, like cli; hlt) */
	cmp qword ptr [V_VARIANT], 3
	jne 1f
	HALTLOOP hc_if0, 0, HC 0x1009
1:
	cmp qword ptr [V_VARIANT], 1
	jne 1f
	REC "k.write_supervisor_page", 0
	lea rax, [rip + 2f]
	mov [V_RESUME], rax
	mov qword ptr [G_SONLY + 8], 1
2:	REC "  survived", 1
1:	cmp qword ptr [V_VARIANT], 2
	jne 1f
	REC "k.read_supervisor_page", 0
	lea rax, [rip + 2f]
	mov [V_RESUME], rax
	mov rax, [G_SONLY]
2:	REC "  survived.rax", rax
1:	jmp end_run

/* ------------------------------------------------------------------ experiment ret */
/* Kernel-driven: each step returns to user code, which records what it sees and comes
   back with syscall 5 (continue at [V_STATE]). */
.macro NEXT label
	lea rax, [rip + \label]
	mov [V_STATE], rax
.endm
exp_ret:
	mov qword ptr [V_UCR3], 0
	NEXT ret_s1
	REC "r.100d_slots", 0
	mov qword ptr [V_FRAME], 0xa0a0
	mov qword ptr [V_FRAME + 8], 0xb1b1
	mov qword ptr [V_FRAME + 16], 0xc2c2
	mov rax, offset u_dumpregs
	mov [V_FRAME + 24], rax
	mov qword ptr [V_FRAME + 32], 0x33
	mov qword ptr [V_FRAME + 40], 0x202
	mov qword ptr [V_FRAME + 48], G_USTACK + 0x3000
	mov qword ptr [V_FRAME + 56], 0x2b
	mov ecx, 0xcccc
	mov edx, 0xdddd
	mov esi, 0x5151
	mov edi, 0xd1d1
	mov ebp, 0xbebe
	mov r8d, 0x8888
	mov r9d, 0x9999
	mov r10d, 0x1010
	mov r11d, 0xbbbb
	mov byte ptr [G_VIF], 1
	mov ebx, V_FRAME
	HC 0x100d
	REC "  100d.returned!", rax
	jmp end_run
ret_s1:
	mov rsp, G_KSTACK + 0x3000
	NEXT ret_s2
	REC "r.sysretq.vif_if0.r11_if1", 0
	mov byte ptr [G_VIF], 0
	mov rcx, offset u_vifcheck
	mov r11d, 0x202
	mov rsp, G_USTACK + 0x3000
	sysretq
ret_s2:
	mov rsp, G_KSTACK + 0x3000
	NEXT ret_s3
	REC "r.100d.vif_if0.frame_if1", 0
	mov byte ptr [G_VIF], 0
	mov rax, offset u_vifcheck
	mov qword ptr [V_FRAME + 40], 0x202
	call ret_frame_100d
ret_s3:
	mov rsp, G_KSTACK + 0x3000
	NEXT ret_s4
	REC "r.100d.vif_if1.frame_if0", 0
	mov byte ptr [G_VIF], 1
	mov rax, offset u_vifcheck
	mov qword ptr [V_FRAME + 40], 0x2
	call ret_frame_100d
	/* a pending interrupt (queued while VIF.if = 0) and the return sequence */
.macro PEND name, next
	mov rsp, G_KSTACK + 0x3000
	call drain_irq
	NEXT \next
	REC "r.pending.\name", 0
	mov qword ptr [V_IRQN], 0
	mov qword ptr [V_IRQSEEN], 0
	mov qword ptr [V_IRQCS], 0
	mov byte ptr [G_VIF], 0
	mov al, IRQ_VEC
	out P_INJECT, al
	nop
	movzx eax, byte ptr [G_VIF + 1]
	REC "  vif.pending.before", rax
	lea rax, [rip + 1f]
	REC "  seq.at", rax
	mov rcx, offset u_pend
	mov r11d, 0x202
.endm
ret_s4:
	PEND if1_nops_sysretq, ret_s5
1:	mov byte ptr [G_VIF], 1
	.rept 16
	nop
	.endr
	mov rsp, G_USTACK + 0x3000
	sysretq
ret_s5:
	PEND if1_swapgs_sysretq, ret_s6
1:	mov byte ptr [G_VIF], 1
	swapgs
	swapgs
	mov rsp, G_USTACK + 0x3000
	sysretq
ret_s6:
	PEND if0_sysretq, ret_s7
1:	mov rsp, G_USTACK + 0x3000
	sysretq
ret_s7:
	PEND if1_mov_cr3_sysretq, ret_s8
1:	mov byte ptr [G_VIF], 1
	mov rax, cr3
	mov cr3, rax
	mov rsp, G_USTACK + 0x3000
	sysretq
ret_s8:
	PEND if1_100d, ret_s9
1:	mov byte ptr [G_VIF], 1
	mov qword ptr [V_FRAME + 40], 0x202
	mov rax, rcx
	call ret_frame_100d
ret_s9:
	PEND if0_100d_frame_if1, ret_s10
1:	mov qword ptr [V_FRAME + 40], 0x202
	mov rax, rcx
	call ret_frame_100d
ret_s10:
	PEND if1_out80_sysretq, ret_s11
1:	mov byte ptr [G_VIF], 1
	out 0x80, al
	mov rsp, G_USTACK + 0x3000
	sysretq
ret_s11:
	mov rsp, G_KSTACK + 0x3000
	call drain_irq
	/* frames a user can shape (sigreturn, ptrace): what does 0x100d make of them? Each
	   returns to u_modecheck, which tries a port write (only host kernel mode may) */
	mov r12, offset badframes
	mov [V_TMP2 + 0x200], r12
ret_badframe_next:
	mov rsp, G_KSTACK + 0x3000
	mov r12, [V_TMP2 + 0x200]
	mov rax, [r12]
	cmp rax, -1
	je end_run
	add qword ptr [V_TMP2 + 0x200], 40
	NEXT ret_badframe_next
	mov rax, [r12 + 32]
	REC "r.100d.badframe", rax
	mov rax, [r12]                   /* cs */
	REC "  cs", rax
	mov rax, [r12 + 8]
	REC "  ss", rax
	mov rax, [r12 + 24]
	REC "  rflags", rax
	mov rax, [r12 + 16]
	REC "  rip", rax
	mov qword ptr [V_FRAME], 0
	mov qword ptr [V_FRAME + 8], 0
	mov qword ptr [V_FRAME + 16], 0
	mov [V_FRAME + 24], rax
	mov rax, [r12]
	mov [V_FRAME + 32], rax
	mov rax, [r12 + 24]
	mov [V_FRAME + 40], rax
	mov qword ptr [V_FRAME + 48], G_USTACK + 0x3000
	mov rax, [r12 + 8]
	mov [V_FRAME + 56], rax
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	mov byte ptr [G_VIF], 0
	mov ebx, V_FRAME
	HC 0x100d
1:	mov rax, [V_FAULTVEC]
	REC "  100d_did_not_return_to_user.vector", rax
	mov qword ptr [V_RESUME], 0
	jmp ret_badframe_next
.data
/* cs, ss, rip (0 = u_modecheck), rflags, tag */
badframes:
	.quad 0x33, 0x2b, u_modecheck, 0x202, 1
	.quad 0x13, 0x2b, u_modecheck, 0x202, 2
	.quad 0x10, 0x18, u_modecheck, 0x202, 3
	.quad 0x1b, 0x2b, u_modecheck, 0x202, 4
	.quad 0x23, 0x2b, u_modecheck, 0x202, 5
	.quad 0x2b, 0x2b, u_modecheck, 0x202, 6
	.quad 0x43, 0x2b, u_modecheck, 0x202, 7
	.quad 0x33, 0x13, u_modecheck, 0x202, 8
	.quad 0x33, 0x1b, u_modecheck, 0x202, 9
	.quad 0x33, 0x0, u_modecheck, 0x202, 10
	.quad 0x33, 0x2b, 0x800000000000, 0x202, 11
	.quad 0x33, 0x2b, 0xffff800000001000, 0x202, 12
	.quad 0x33, 0x2b, u_modecheck, 0x3202, 13
	.quad 0x33, 0x2b, u_modecheck, 0x24302, 14
	.quad 0x33, 0x2b, u_modecheck, 0x4202, 15
	.quad 0x3b, 0x2b, u_modecheck, 0x202, 16
	.quad -1, 0, 0, 0, 0
.text

/* return to user RIP rax through hypercall 0x100d (rflags already in V_FRAME + 40) */
ret_frame_100d:
	mov [V_FRAME + 24], rax
	mov qword ptr [V_FRAME + 32], 0x33
	mov qword ptr [V_FRAME + 48], G_USTACK + 0x3000
	mov qword ptr [V_FRAME + 56], 0x2b
	mov qword ptr [V_FRAME], 0
	mov ebx, V_FRAME
	HC 0x100d
	REC "  100d.returned!", rax
	jmp end_run
/* deliver whatever is pending, then VIF.if = 0 */
drain_irq:
	mov byte ptr [G_VIF], 1
	out 0x80, al
	mov rax, [V_IRQN]
	REC "  irq.count.after_drain", rax
	mov byte ptr [G_VIF], 0
	ret

/* ------------------------------------------------------------------ experiment perm */
exp_perm:
	mov qword ptr [V_UCR3], G_UPML4
	mov rsi, offset u_perm
	jmp enter_user

/* ------------------------------------------------------------------ experiment cost */
exp_cost:
	mov qword ptr [V_UCR3], 0
	mov qword ptr [V_QUIETEV], 1
	mov rsi, offset u_cost
	jmp enter_user

/* ------------------------------------------------------------------ experiment hostile */
exp_hostile:
	mov rax, [V_VARIANT]
	cmp rax, 15
	ja end_run
	mov rdx, offset hostab
	jmp qword ptr [rdx + rax * 8]
hostab: .quad h_vif_garbage, h_unknown_hc, h_100d_notpresent, h_100d_noncanonical, h_100d_supervisor
	.quad h_setcr3_beyond_ram, h_setcr3_flags, h_load_idt_wild, h_load_gdt_wild, h_vif_beyond_ram
	.quad h_vif_unaligned, h_vif_zero, h_vif_mmio_hole, h_vif_flags_all, h_msr_scan, h_vif_user
.macro HCREC n
	mov rax, \n
	int 0x1b
	REC "  hc.\n\().rax", rax
.endm
h_vif_garbage:
	REC "h.vif_page_garbage", 0
	mov rdi, G_VIF
	mov ecx, 4096
	mov al, 0xff
	rep stosb
	SPIN 1000000
	out 0x80, al
	REC "  after_spin_and_exit", 1
	mov al, IRQ_VEC
	out P_INJECT, al
	SPIN 1000000
	mov rax, [V_IRQN]
	REC "  irq.count", rax
	mov rdi, G_VIF
	mov ecx, 4096
	mov al, 0xff
	rep stosb
	mov rsi, offset u_hostile
	jmp enter_user
h_unknown_hc:
	REC "h.unknown_hypercalls", 0
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	HCREC 0
	HCREC 1
	HCREC 0xfff
	HCREC 0x100e
	HCREC 0x100f
	HCREC 0x1010
	HCREC 0x1011
	HCREC 0x10ff
	HCREC 0x2000
	HCREC 0x7fffffff
	HCREC 0xffffffff
	HCREC 0x100001007
	HCREC 0xffffffff00001009
1:	mov rax, [V_FAULTVEC]
	REC "  last.vector", rax
	jmp end_run
h_100d_notpresent:
	REC "h.100d.frame_not_present", 0
	mov ebx, G_NOTPRES
	jmp 1f
h_100d_noncanonical:
	REC "h.100d.frame_noncanonical", 0
	mov rbx, 0xdead000000000000
	jmp 1f
h_100d_supervisor:
	REC "h.100d.frame_supervisor_page", 0
	mov rax, offset u_vifcheck
	mov [G_SONLY + 24], rax
	mov qword ptr [G_SONLY + 32], 0x33
	mov qword ptr [G_SONLY + 40], 0x202
	mov qword ptr [G_SONLY + 48], G_USTACK + 0x3000
	mov qword ptr [G_SONLY + 56], 0x2b
	mov ebx, G_SONLY
1:	lea rax, [rip + 2f]
	mov [V_RESUME], rax
	NEXT end_run
	HC 0x100d
2:	REC "  rax", rax
	mov rax, [V_FAULTVEC]
	REC "  vector", rax
	jmp end_run
h_setcr3_beyond_ram:
	REC "h.set_cr3_beyond_ram", 0
	out P_REPORT, al
	mov ebx, 0xdead000
	HC 0x1001
	REC "  survived.rax", rax
	jmp end_run
h_setcr3_flags:
	REC "h.set_cr3_low_bits", 0
	mov ebx, G_KPML4 | 0xfff
	HC 0x1001
	REC "  rax", rax
	mov rax, cr3
	REC "  cr3", rax
	jmp end_run
h_load_idt_wild:
	REC "h.load_idt_wild", 0
	mov rbx, 0xdead00000000
	mov ecx, 0xffff
	HC 0x1005
	REC "  rax", rax
	out P_REPORT, al
	int3
	REC "  after_int3", 0
	jmp end_run
h_load_gdt_wild:
	REC "h.load_gdt_wild", 0
	mov rbx, 0xdead00000000
	mov ecx, 0xffff
	HC 0x1004
	REC "  rax", rax
	out P_REPORT, al
	mov eax, 0x18
	mov ds, ax
	REC "  after_ds_load", 0
	mov rsi, offset u_hostile
	jmp enter_user
.macro VIFSET val
	mov ecx, 0x4b564d10
	mov rax, \val
	mov rdx, rax
	shr rdx, 32
	lea rbx, [rip + 1f]
	mov [V_RESUME], rbx
	mov qword ptr [V_FAULTVEC], -1
	wrmsr
1:	mov rax, [V_FAULTVEC]
	REC "  wrmsr.vector", rax
	mov ecx, 0x4b564d10
	call rdmsr_safe
	REC "  readback", rax
	RDTSC64 r8
	SPIN 10000
	RDTSC64 r9
	sub r9, r8
	REC "  loop10k.cyc", r9
	mov ax, cs
	movzx eax, ax
	REC "  cs", rax
.endm
h_vif_beyond_ram:
	REC "h.vif_beyond_ram", 0
	VIFSET 0x10000000
	jmp end_run
h_vif_unaligned:
	REC "h.vif_unaligned", 0
	VIFSET G_VIF + 8
	jmp end_run
h_vif_zero:
	REC "h.vif_zero", 0
	VIFSET 0
	jmp end_run
h_vif_mmio_hole:
	REC "h.vif_in_mmio_hole", 0
	VIFSET 0xd0000000
	mov al, IRQ_VEC
	out P_INJECT, al
	SPIN 100000
	REC "  survived", 1
	jmp end_run
h_vif_flags_all:
	REC "h.vif_flags_all", 0
	VIFSET G_VIF | 0x3fe
	jmp end_run
h_msr_scan:
	REC "h.msr_scan_4b564dxx", 0
	mov esi, 0x4b564d00
1:	mov ecx, esi
	call rdmsr_safe
	cmp qword ptr [V_FAULTVEC], -1
	jne 2f
	REC "  msr", rsi
	REC "    value", rax
2:	inc esi
	cmp esi, 0x4b564e00
	jne 1b
	REC "h.wrmsr_readonly_pv_msrs", 0
	mov esi, 0x4b564d11
1:	mov ecx, esi
	mov eax, 0x1234
	xor edx, edx
	lea rbx, [rip + 2f]
	mov [V_RESUME], rbx
	mov qword ptr [V_FAULTVEC], -1
	wrmsr
2:	mov rax, [V_FAULTVEC]
	REC "  wrmsr.vector", rax
	mov ecx, esi
	call rdmsr_safe
	REC "  readback", rax
	inc esi
	cmp esi, 0x4b564d14
	jne 1b
	jmp end_run
h_vif_user:
	/* user code writes garbage into the VIF page (mapped for it in this probe) */
	REC "h.user_writes_vif", 0
	mov rsi, offset u_vif_garbage
	jmp enter_user
